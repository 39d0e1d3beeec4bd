"""Where Ray's, Tune's, MLflow's and Optuna's own output goes while a study runs (set up before Ray starts).

:func:`configure_output` turns their console chatter off (their start-up lines, Tune's boxed experiment table and
its "View detailed results" / TensorBoard hints, the token-authentication warning, artifact download bars) and
sends their log records to ``<study>/logs/study.log`` instead; ``--verbose`` leaves them on the console. Apart from
the live console (orchestrator/console.py), which draws above the tuner: this is needed below the study.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

NOISY_LOGGERS = ("ray", "mlflow", "alembic", "optuna")


def configure_output(study_dir: Optional[Path], verbose: bool = False,
                     loggers: tuple[str, ...] = NOISY_LOGGERS) -> Optional[Path]:
    """Before Ray starts. Ray's, Tune's, MLflow's and Optuna's log records (INFO and up) go to
    ``<study>/logs/study.log``; on the console only their errors, unless ``verbose``. Also silences Tune's own
    progress output (its boxed experiment table, "View detailed results", the TensorBoard hint) and MLflow's
    download bars. ``loggers``: which of them to configure now. Returns the log file."""
    if not verbose:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's legacy reporter: silent at verbose=0
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if "mlflow" in loggers:
        import mlflow  # noqa: F401  (configures its loggers on import: do it before adjusting them)

    path = None
    if study_dir is not None:
        path = Path(study_dir) / "logs" / "study.log"
        path.parent.mkdir(parents=True, exist_ok=True)
    for name in loggers:
        lg = logging.getLogger(name)
        if lg.level == logging.NOTSET or lg.level > logging.INFO:
            lg.setLevel(logging.INFO)
        if path is not None and not any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve()
                                        for h in lg.handlers):
            fh = logging.FileHandler(path)
            fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            lg.addHandler(fh)
        streams = [h for h in lg.handlers
                   if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
        if not streams:
            streams = [logging.StreamHandler(sys.stderr)]
            lg.addHandler(streams[0])
        for h in streams:
            h.setLevel(logging.NOTSET if verbose else logging.ERROR)
            if not verbose and not any(isinstance(f, _StudyReportsThese) for f in h.filters):
                h.addFilter(_StudyReportsThese())
        lg.propagate = False  # their records reach the console through these handlers only
    return path


class _StudyReportsThese(logging.Filter):
    """Off the console (kept in the study log): Tune's and Ray Train's records about trials (a failed trial's
    traceback, "Trials did not complete"), the raylet's error lines (a killed worker, the memory monitor's
    report; orchestrator/faults.py) and any record carrying a traceback (MLflow's store errors). The study's console says what they say, one line per trial with its reason,
    and the CLI a stopped study with the `taalm resume` command."""

    PREFIXES = ("ray.tune", "ray.train", "ray.air", "ray.taalm")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(self.PREFIXES):
            return False
        # a library's traceback (MLflow's store error, ...): the CLI says what stopped the study, in one line
        return not (record.exc_info or "Traceback (most recent call last)" in record.getMessage())
