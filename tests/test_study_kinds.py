"""Grids and searches open, run and end the same way (issue 28): one start-up (orchestrator/session.py), one
stage runner, one final status, one progress protocol; the kinds' table drives `taalm resume` and the view."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port_number

ROOT = Path(__file__).resolve().parents[1]
TAALM = str(Path(sys.executable).parent / "taalm")
SEARCH = ROOT / "search_spaces" / "tiny_search.yaml"
GRID = ROOT / "ablations" / "smoke_tiny.yaml"


def _parent_status(tracking_uri: str, name: str) -> str:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri)
    exp = c.get_experiment_by_name(name)
    runs = c.search_runs([exp.experiment_id], "tags.`taalm.role` = 'study'")
    assert len(runs) == 1
    return runs[0].info.status


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["grid", "search"])
def test_a_study_whose_tracking_server_is_unreachable_stops_with_one_line(kind, ray_head, tmp_path):
    """`--tracking-uri` naming a server nothing listens on: the study stops (exit 1) saying so in one line, for a
    search as for a grid (a search used to fit without the MLflow side's error handling: Tune's error instead)."""
    port = free_port_number()  # free now: nothing listens there
    uri = f"http://127.0.0.1:{port}"
    cmd = [TAALM, "ablate", str(GRID), "--set", "axes={weighting.scheme: [oracle]}"] if kind == "grid" else \
        [TAALM, "tune", str(SEARCH), "--set", "num_samples=1"]
    env = dict(os.environ, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    p = subprocess.run(cmd + ["--out", str(tmp_path), "--tracking-uri", uri, "--set", "resources.max_concurrent=1"],
                       capture_output=True, text=True, timeout=600, env=env)
    out = p.stdout + p.stderr
    assert p.returncode == 1, out[-4000:]
    stopped = [line for line in out.splitlines() if line.startswith("the study stopped: ")]
    assert len(stopped) == 1, out[-4000:]
    assert f"127.0.0.1:{port}" in stopped[0] or "onnection refused" in stopped[0], stopped[0]
    assert "TuneError" not in stopped[0] and "Traceback" not in out, out[-4000:]


@pytest.mark.integration
def test_a_search_in_which_every_trial_failed_ends_failed(ray_local, tmp_path):
    """Every trial of a search failed (a time budget no trial can meet): the study's run ends FAILED, as a grid's
    does (a search used to end FINISHED whatever its trials did); a grid with one trial left is FINISHED."""
    from orchestrator.ablation import run_ablation
    from orchestrator.search import run_search

    r = run_search(SEARCH, ["num_samples=2", "resources.time_budget_s=0.001"], out_root=tmp_path)
    assert r["trials"] == 2 and r["failed"] == 2
    assert _parent_status(r["tracking_uri"], "tiny_search") == "FAILED"
    g = run_ablation(GRID, ["axes={weighting.scheme: [oracle]}"], out_root=tmp_path)
    assert g["failed"] == 0 and _parent_status(g["tracking_uri"], "smoke_tiny") == "FINISHED"


class Recording:
    """A progress object that only records (not a Tune callback): what the protocol promises every kind says."""

    def __init__(self):
        self.notes, self.stages = [], []

    def note(self, text):
        self.notes.append(text)

    def expect(self, stage, trials, concurrency, done_before=None, total=None):
        self.stages.append((stage, len(trials), concurrency, total))

    def close(self):
        pass


@pytest.mark.integration
def test_progress_is_a_protocol_every_kind_calls_the_same_way(ray_local, tmp_path):
    """The runners call the progress protocol's methods on whatever they are given (no `hasattr`): a do-nothing
    default when given none, and the same calls from a grid and a search."""
    import ast

    from orchestrator.ablation import run_ablation
    from orchestrator.progress import Progress
    from orchestrator.search import run_search

    for p in (ROOT / "orchestrator").glob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "hasattr":
                assert "progress" not in ast.unparse(node), f"{p.name}: {ast.unparse(node)}"
    assert all(getattr(Progress(), m)(*a) is None for m, a in (("note", ("x",)), ("expect", ("s", [], 1)),
                                                               ("close", ())))
    grid, search = Recording(), Recording()
    run_ablation(GRID, ["axes={weighting.scheme: [oracle]}", "name=g"], out_root=tmp_path, progress=grid)
    run_search(SEARCH, ["num_samples=1", "name=s"], out_root=tmp_path, progress=search)
    for rec in (grid, search):
        assert any(n.startswith("Ray: ") for n in rec.notes), rec.notes
        assert any(n.startswith("trials: memory: ") for n in rec.notes), rec.notes
    assert grid.stages == [("trials", 1, 2, None)] and search.stages == [("trials", 0, 2, 1)]
    run_ablation(GRID, ["axes={weighting.scheme: [oracle]}", "name=g2"], out_root=tmp_path)  # no progress at all


def test_resume_and_the_view_read_the_kinds_table(tmp_path):
    """`taalm resume` and an older study's MLflow view go through the row study.json names; a kind the table does
    not have is bad input naming the record."""
    from orchestrator.kinds import KINDS, for_resume, view_columns
    from orchestrator.specs import StudyRecord
    from trainables.errors import InputError

    assert set(KINDS) == {"grid", "search"}
    for kind, source, columns in (("grid", GRID, (["weighting.scheme", "seed"], None)),
                                  ("search", SEARCH, (["train.lr", "weighting.scheme", "weighting.rho1.k", "seed"],
                                                      ("total_knowledge", False)))):
        d = tmp_path / kind
        d.mkdir()
        StudyRecord(kind=kind, name=kind, tracking_uri="sqlite:///x.db", source=str(source),
                    out_root=str(tmp_path)).write(d)
        record, loaded = for_resume(d)
        assert loaded.kind is KINDS[kind] and view_columns(record) == columns
    d = tmp_path / "other"
    d.mkdir()
    (d / "study.json").write_text(json.dumps({"kind": "sweep", "name": "o", "tracking_uri": "sqlite:///x.db",
                                              "source": str(GRID), "out_root": str(tmp_path)}))
    with pytest.raises(InputError, match="unknown study kind 'sweep'"):
        for_resume(d)
