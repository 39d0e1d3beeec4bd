"""The orchestrator around trainables/: the `taalm` CLI (cli.py), grids and search spaces (grid.py, search.py)
validated before anything starts, studies under Ray Tune (study.py; trials through ray_trainables.py, lean in
their Tune process or as Ray Train workers), the typed records that cross into Ray and onto disk (specs.py),
MLflow tracking (tracking.py), the live console (console.py) and reports from MLflow (report.py)."""
