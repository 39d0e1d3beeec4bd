"""A study's MLflow store, without Ray: one experiment, a parent run (taalm.role=study), a child run per trial.

What a trial's run records (:func:`run_params`), the study run (:class:`Study`: created once, found again, its
running time over sessions) and a run's end (:func:`terminate`). The Tune callback that writes the trials' runs
as they report is orchestrator/tracking.py; the report and the MLflow views read what is written here.

A run's params are what a reader compares trials by (:func:`run_params`: the grid's axes, the model, data
sizes, training settings and the options of the chosen methods); the full resolved config is the run's
``config.json``. A run's recorded duration is its running time: a trial (or study) that was interrupted and
resumed ends at ``start + running time`` (MLflow's Duration column), the time it spent interrupted is the
``taalm.interrupted_seconds`` tag and the running time also the ``taalm.running_seconds`` tag.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from trainables.config import flatten, scheme_names

from .mlflow_views import save_trials_view as _save_view, study_run

RUNNING_TAG = "taalm.running_seconds"  # seconds the run has run, over all its attempts
INTERRUPTED_TAG = "taalm.interrupted_seconds"  # seconds between its start and its end it was not running

# what a reader of the runs table needs besides the grid's axes: the model, the data sizes, the training
# settings and which method a trial is (with the options of the chosen methods only)
RUN_SETTINGS = ("model.name", "data.split", "data.task", "data.to_learn_size", "data.ntf_size",
                "data.max_doc_tokens", "train.epochs", "train.lr", "train.batch_size", "params.kind",
                "weighting.scheme", "regularizer.kind", "replay.kind")
META_SETTINGS = ("model.name", "task", "records", "data.split", "data.to_learn_size", "data.ntf_size",
                 "params.kind", "params.r", "meta.steps", "meta.epochs", "meta.batch_size", "meta.lr",
                 "meta.inner_optimizer", "meta.inner_lr", "meta.inner_steps", "meta.dummy_loop", "meta.objective",
                 "meta.pool_size")


def run_params(cfg: dict, axes: dict | None = None, **extra) -> dict:
    """A trial's MLflow params (dotted config keys): ``RUN_SETTINGS``, the options of its parameterisation,
    weighting schemes, regulariser and replay (only those it uses), the TemporalWiki periods, the grid's axes
    (``axes``, whatever keys they vary) and ``extra`` (label, seed). Unset options (None) are left out."""
    flat = flatten(cfg)
    keys = list(RUN_SETTINGS)

    def options(prefix: str) -> None:
        keys.extend(k for k in flat if k.startswith(prefix))

    kind = flat.get("params.kind")
    if kind in ("lora", "qlora"):
        keys += ["params.r", "params.alpha"]
    else:
        options(f"params.{kind}.")
    try:
        for name in scheme_names(flat.get("weighting.scheme", "uniform")):
            options(f"weighting.{name}.")
    except ValueError:
        pass
    if flat.get("regularizer.kind", "none") != "none":
        options(f"regularizer.{flat['regularizer.kind']}.")
    if flat.get("replay.kind", "none") != "none":
        keys += ["replay.pool", "replay.ratio", "replay.size"]
        options(f"replay.{flat['replay.kind']}.")
    out = {k: flat[k] for k in dict.fromkeys(keys) if flat.get(k) is not None}
    tw = cfg.get("temporalwiki")
    if isinstance(tw, dict):
        out["temporalwiki.periods"] = ",".join(str(p.get("name")) for p in tw.get("periods") or [])
        out.update({f"temporalwiki.{k}": tw[k] for k in ("epochs_per_period", "probe_size", "diff_size",
                                                                   "max_docs_per_period", "filter", "long_docs")
                    if tw.get(k) is not None})
    out.update(axes or {})
    out.update(extra)
    return out


def meta_params(cfg: dict) -> dict:
    """The meta-training stage's MLflow params (``META_SETTINGS`` and the seed); its config is meta_config.json."""
    flat = flatten(cfg)
    return {**{k: flat[k] for k in META_SETTINGS if flat.get(k) is not None}, "seed": cfg.get("seed")}


def default_tracking_uri(study_dir: Path) -> str:
    return f"sqlite:///{(study_dir / 'mlflow.db').resolve()}"


def code_version() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip()
        return sha or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def fresh_sqlite_store(db: Path) -> None:
    """A new sqlite store starts as a copy of an empty store MLflow created and migrated once per MLflow version
    (in the cache directory): migrating every new store through all of MLflow's schema revisions costs ~2 s
    of every study's start. An existing store is left alone."""
    import os
    import shutil

    import mlflow
    from mlflow.tracking import MlflowClient

    from trainables.models import cache_dir

    if db.exists():
        return
    template = cache_dir() / "mlflow" / f"empty-store-{mlflow.__version__}.db"
    if not template.is_file():
        template.parent.mkdir(parents=True, exist_ok=True)
        tmp = template.with_name(f"{template.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        MlflowClient(f"sqlite:///{tmp}").search_experiments()  # MLflow creates the schema at its newest revision
        os.replace(tmp, template)
    db.parent.mkdir(parents=True, exist_ok=True)
    tmp = db.with_name(f"{db.name}.{os.getpid()}.tmp")
    shutil.copyfile(template, tmp)
    os.replace(tmp, db)


class Study:
    """The MLflow side of a study: experiment and parent run, created once and found again."""

    def __init__(self, tracking_uri: str, name: str, study_dir: Path, protocol: str = "lama_ckl", clock=None):
        from mlflow.tracking import MlflowClient

        self.uri, self.name, self.dir, self.protocol = tracking_uri, name, study_dir, protocol
        self.clock = clock or time.time  # seconds; runs' start and end times and running time are read from it
        began = self.clock()
        if tracking_uri.startswith("sqlite:///"):
            from trainables.checkpoint import exclusive

            # studies opening a new sqlite store at the same time race on MLflow's schema creation (alembic:
            # "Online migration expected to match one row ... 0 found"): one creates it, the others wait
            db = Path(tracking_uri[len("sqlite:///"):].split("?")[0])
            with exclusive(db):
                fresh_sqlite_store(db)
                self.client = MlflowClient(tracking_uri)
        else:
            self.client = MlflowClient(tracking_uri)
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            artifacts = (study_dir / "mlartifacts").resolve()
            artifacts.mkdir(parents=True, exist_ok=True)
            # the training view of MLflow 3's UI (its default for a new experiment is the GenAI view)
            self.experiment_id = self.client.create_experiment(name, artifact_location=artifacts.as_uri(), tags={
                "mlflow.experimentKind": "custom_model_development"})
        else:
            self.experiment_id = exp.experiment_id
        found = study_run(self.client, self.experiment_id)
        if found is not None:
            self.parent_id = found.info.run_id
            self.client.update_run(self.parent_id, status="RUNNING")
        else:
            self.parent_id = self.client.create_run(
                self.experiment_id, run_name=name, start_time=int(self.clock() * 1000), tags={
                    "taalm.role": "study", "taalm.protocol": protocol, "taalm.code_version": code_version()}
            ).info.run_id
        self._start_session(began)

    def _start_session(self, began: float) -> None:
        """This driver process runs the study since ``began``; earlier sessions recorded their running time."""
        run = self.client.get_run(self.parent_id)
        self.parent_start_ms = run.info.start_time
        self.recorded_s = float(run.data.tags.get(RUNNING_TAG, 0) or 0)
        self.session_start = began

    def running_seconds(self) -> float:
        return self.recorded_s + max(0.0, self.clock() - self.session_start)

    def record_running(self) -> None:
        """Persist the study's running time so far (a driver killed later loses at most the time since)."""
        self.client.set_tag(self.parent_id, RUNNING_TAG, f"{self.running_seconds():.1f}")

    def __getstate__(self):
        # Tune pickles its callbacks with the experiment state: keep ids, rebuild the client on load (and, in
        # the process that loads it, e.g. `taalm resume`, count running time from then)
        return {k: v for k, v in self.__dict__.items() if k not in ("client", "clock")}

    def __setstate__(self, state):
        from mlflow.tracking import MlflowClient

        self.__dict__.update(state)
        self.clock = time.time
        self.client = MlflowClient(self.uri)
        self._start_session(self.clock())

    def save_trials_view(self, params: list[str], order: tuple[str, bool] | None = None) -> str | None:
        """The study's saved view of its trials in MLflow's runs table (orchestrator/mlflow_views.py): the summary
        metrics, then ``params`` (the grid's axes, the seed). Returns its id, or None when the store refuses it
        (the study goes on without it; the reason is in the study's log)."""
        import logging

        from mlflow.exceptions import MlflowException

        try:
            return _save_view(self.client, self.experiment_id, self.name, getattr(self, "protocol", "lama_ckl"),
                                    params, order)
        except (MlflowException, ValueError, OSError) as e:
            logging.getLogger("mlflow").warning("taalm: no saved view of the trials: %s", e)
            return None

    def child(self, key: str, run_name: str, role: str, params: dict, tags: dict) -> str:
        found = self.client.search_runs(
            [self.experiment_id], f"tags.`taalm.trial_key` = '{key}' and tags.`taalm.role` = '{role}'", max_results=5)
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = self.client.create_run(self.experiment_id, run_name=run_name, start_time=int(self.clock() * 1000), tags={
            "mlflow.parentRunId": self.parent_id, "taalm.role": role, "taalm.trial_key": key,
            "taalm.code_version": code_version(), **{k: str(v) for k, v in tags.items()}})
        from mlflow.entities import Param

        items = [Param(k, str(v)[:500]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run.info.run_id, params=items[i:i + 100])
        return run.info.run_id

    def finish(self, status: str = "FINISHED") -> None:
        """End the study run; its recorded duration is its running time (over sessions, e.g. `taalm resume`)."""
        terminate(self.client, self.parent_id, self.parent_start_ms, self.running_seconds(), self.clock(), status)


def terminate(client, run_id: str, start_ms: int, running_s: float, now_s: float, status: str) -> None:
    """End a run at ``start + running time`` (MLflow's Duration column is end - start), with its running time and
    the time it spent interrupted (the rest of start..now) as tags."""
    from mlflow.entities import RunTag

    interrupted = max(0.0, now_s - start_ms / 1000 - running_s)
    client.log_batch(run_id, tags=[RunTag(RUNNING_TAG, f"{running_s:.1f}"),
                                   RunTag(INTERRUPTED_TAG, f"{interrupted:.1f}")])
    client.set_terminated(run_id, status=status, end_time=start_ms + int(round(running_s * 1000)))
