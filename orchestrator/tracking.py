"""MLflow tracking of a study: one experiment, a parent run (taalm.role=study), a child run per trial.

All MLflow writes happen in the Tune driver process through a Tune callback, so concurrent trials
never write to the store at the same time; a child run is found again by its trial key, and epochs
already logged are not logged twice (a resumed study neither loses nor duplicates anything).

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

from ray import tune

from trainables.config import flatten, scheme_names
from trainables.loop import UNIT

SUMMARY = ("top_acc", "top_epoch", "nf_acc", "total_knowledge", "avg_changed_ppl", "avg_unchanged_ppl")
CURVES = ("to_learn_acc", "ntf_acc", "to_learn_em", "ntf_em", "train_loss", "mean_weight", "changed_ppl",
          "unchanged_ppl", "micro_batch_size")
PLACEMENT = ("node_id", "pid", "device", "gpu_ids", "gpu_share", "device_note")  # tagged once per driver
CHECKS = ("val_acc", "object_weight_ratio", "object_weight_share", "uniform_share")  # meta-training's checks


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
        out.update({f"temporalwiki.{k}": tw[k] for k in ("epochs_per_period", "probe_size", "diff_size")
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
        found = self.client.search_runs([self.experiment_id], "tags.`taalm.role` = 'study'", max_results=1)
        if found:
            self.parent_id = found[0].info.run_id
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

        from .mlflow_views import save_trials_view

        try:
            return save_trials_view(self.client, self.experiment_id, self.name, getattr(self, "protocol", "lama_ckl"),
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


class MlflowTrials(tune.Callback):
    """Tune callback: child run per trial, per-epoch metrics (step = epoch), final metrics, artifacts."""

    def __init__(self, study: Study, trial_info: dict[str, dict], describe=None):
        self.study = study
        self.info = trial_info  # trial key -> {"run_name", "params", "config", "role", "tags"}
        self.describe = describe  # trial -> info, for trials not known in advance (searches)
        self.run_ids: dict[str, str] = {}
        self.logged: dict[str, set] = {}
        self.curves: dict[str, dict[str, dict[int, float]]] = {}
        # trial key -> {"uuids": {...}, "to_learn": {epoch: [acc per fact]}, "ntf": {...}}: per_fact.json
        self.per_fact: dict[str, dict] = {}
        self.placed: set[str] = set()  # trials whose node and process are tagged
        self.resumed: dict[str, float] = {}  # trial key -> the index its latest attempt resumed from (tagged)
        self._reset_clocks()

    # running time per trial key, kept in this driver process only: a driver that loads this callback from Tune's
    # saved experiment state (`taalm resume`) reads what earlier attempts recorded from the run's tag instead
    _CLOCKS = ("recorded", "attempt_start", "start_ms")

    def _reset_clocks(self) -> None:
        self.recorded: dict[str, float] = {}  # seconds earlier attempts ran (as recorded in MLflow)
        self.attempt_start: dict[str, float | None] = {}  # when the running attempt started (None: none runs)
        self.start_ms: dict[str, int] = {}  # the run's start time

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in self._CLOCKS}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset_clocks()

    def _attempt(self, key: str, rid: str, began: float) -> None:
        """An attempt of the trial runs since ``began``, unless one is running already."""
        if key not in self.recorded:
            run = self.study.client.get_run(rid)
            self.recorded[key] = float(run.data.tags.get(RUNNING_TAG, 0) or 0)
            self.start_ms[key] = run.info.start_time
        if self.attempt_start.get(key) is None:
            self.attempt_start[key] = began

    def _running(self, key: str) -> float:
        start = self.attempt_start.get(key)
        return self.recorded[key] + (max(0.0, self.study.clock() - start) if start is not None else 0.0)

    def _end_attempt(self, key: str) -> float:
        self.recorded[key], self.attempt_start[key] = self._running(key), None
        return self.recorded[key]

    def _run(self, trial) -> tuple[str, str]:
        key = trial.config["t"]["trial_key"] if "t" in trial.config else trial.trial_id
        began = self.study.clock()  # a new attempt runs from now (before its run is created or found)
        if key not in self.info and self.describe is not None:
            self.info[key] = self.describe(trial)
        if key not in self.run_ids:
            meta = self.info[key]
            rid = self.study.child(key, meta["run_name"], meta["role"], meta["params"], meta["tags"])
            self.run_ids[key] = rid
            self.logged[key] = {m.step for m in self.study.client.get_metric_history(rid, "val_acc")}
            self.curves[key] = {}
            for name in CURVES:
                for m in self.study.client.get_metric_history(rid, name):
                    self.curves[key].setdefault(name, {})[m.step] = m.value
                    self.logged[key].add(m.step)
            self.study.client.set_tag(rid, "taalm.tune_trial_id", trial.trial_id)
        self._attempt(key, self.run_ids[key], began)
        return key, self.run_ids[key]

    def on_trial_start(self, iteration, trials, trial, **info):
        self._run(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        """One report of a trial's loop (``kind`` epoch / check / period, at ``index``): its curves, every fact's
        accuracy (continual), where it ran; a resumed attempt's first report also carries the reports before its
        checkpoint (``restored``), logged here when MLflow is missing them (the driver may have died first)."""
        key, rid = self._run(trial)
        pf = self.per_fact.setdefault(key, {"uuids": {}, "to_learn": {}, "ntf": {}})
        for earlier in result.get("restored") or []:
            self._log_step(key, rid, int(earlier["index"]), earlier)
            for name in ("to_learn", "ntf"):
                seq = (earlier.get("per_fact") or {}).get(name)
                if seq is not None:
                    pf[name].setdefault(int(earlier["index"]), seq)
        step = int(result.get("index", 0))
        from mlflow.entities import RunTag

        self._log_step(key, rid, step, result, tags=[RunTag(RUNNING_TAG, f"{self._running(key):.1f}")])
        self.study.record_running()
        if isinstance(result.get("per_fact"), dict):
            pf["uuids"].update(result["per_fact"].get("uuids") or {})
            for name in ("to_learn", "ntf"):
                if isinstance(result["per_fact"].get(name), list):
                    pf[name][step] = result["per_fact"][name]
        if isinstance(result.get("node_id"), str) and key not in self.placed:
            self.placed.add(key)  # where it runs: node, process, device (a GPU Ray assigned, or why the CPU)
            from mlflow.entities import RunTag

            self.study.client.log_batch(rid, tags=[RunTag(f"taalm.{k}", str(result[k])) for k in PLACEMENT
                                                   if result.get(k) not in (None, "")])
        resumed = result.get("resumed_from")
        if isinstance(resumed, (int, float)) and resumed >= 0 and self.resumed.get(key) != resumed:
            # an attempt that continued from a checkpoint (a retry or `taalm resume`)
            self.resumed[key] = resumed
            self.study.client.set_tag(rid, f"taalm.resumed_from_{UNIT.get(result.get('kind'), 'epoch')}",
                                      str(int(resumed)))

    def _log_step(self, key: str, rid: str, step: int, values: dict, tags: list | None = None) -> None:
        """Log one report (step = its index) of a trial's curves (and ``tags``), unless it is already in MLflow."""
        from mlflow.entities import Metric

        if step in self.logged[key]:
            return
        names = CURVES if self.info[key]["role"] == "trial" else CHECKS
        now = int(time.time() * 1000)
        metrics = []
        for name in names:
            v = values.get(name)
            if isinstance(v, (int, float)) and v == v:
                metrics.append(Metric(name, float(v), now, step))
                self.curves[key].setdefault(name, {})[step] = float(v)
        self.study.client.log_batch(rid, metrics=metrics, tags=tags or [])
        self.logged[key].add(step)

    def on_trial_complete(self, iteration, trials, trial, **info):
        from mlflow.entities import Metric

        key, rid = self._run(trial)
        meta = self.info[key]
        last = trial.last_result or {}
        now = int(time.time() * 1000)
        if isinstance(last.get("peak_rss_gb"), (int, float)):  # the trial process's peak memory (a warm process: so far)
            self.study.client.set_tag(rid, "taalm.peak_rss_gb", f"{last['peak_rss_gb']:.3f}")
        failure = self.study.client.get_run(rid).data.tags.get("taalm.failure")
        if failure:  # an errored trial that `taalm resume` continued to its end: the failure is history now
            self.study.client.set_tag(rid, "taalm.earlier_failure", failure)
            self.study.client.delete_tag(rid, "taalm.failure")
        if meta["role"] == "trial":
            finals = [Metric(k, float(last[k]), now, 0) for k in SUMMARY
                      if isinstance(last.get(k), (int, float)) and last[k] == last[k]]
            self.study.client.log_batch(rid, metrics=finals)
            self.study.client.log_dict(rid, meta["config"], "config.json")
            self.study.client.log_dict(rid, {k: dict(sorted(v.items())) for k, v in self.curves[key].items()},
                                       "curves.json")
            pf = self.per_fact.get(key)
            if pf and pf["to_learn"] and pf["uuids"]:
                # every fact's accuracy per epoch: the report's paired bootstrap resamples these
                self.study.client.log_dict(rid, {
                    "to_learn_uuids": pf["uuids"].get("to_learn"), "ntf_uuids": pf["uuids"].get("ntf"),
                    "epochs": sorted(pf["to_learn"]),
                    "to_learn": [pf["to_learn"][e] for e in sorted(pf["to_learn"])],
                    "ntf": [pf["ntf"].get(e) for e in sorted(pf["to_learn"])]}, "per_fact.json")
            fig = learning_curve_figure(self.curves[key], meta["run_name"])
            if fig is not None:
                import matplotlib.pyplot as plt

                self.study.client.log_figure(rid, fig, "learning_curve.png")
                plt.close(fig)  # the driver lives as long as the study: do not keep every trial's figure
        else:
            self.study.client.log_dict(rid, meta["config"], "meta_config.json")
            phi = Path(meta["tags"].get("taalm.phi_dir", ""))
            for f in ("phi.json", "phi.safetensors", "heatmap.html", "meta_metrics.json"):
                for cand in (phi / f, phi.parent / f):
                    if cand.is_file():
                        self.study.client.log_artifact(rid, str(cand))
                        break
        self._terminate(key, rid, "FINISHED")

    def _terminate(self, key: str, rid: str, status: str) -> None:
        """End the trial's run at its start plus its running time (time interrupted before a resume is left out
        of MLflow's Duration and kept as a tag); the study's running time so far is recorded too."""
        terminate(self.study.client, rid, self.start_ms[key], self._end_attempt(key), self.study.clock(), status)
        self.study.record_running()

    def on_trial_recover(self, iteration, trials, trial, **info):
        """A failed trial that Tune will retry (resources.max_failures): count it, keep the reason."""
        key, rid = self._run(trial)
        run = self.study.client.get_run(rid)
        retries = int(run.data.tags.get("taalm.retries", "0")) + 1
        self.study.client.set_tag(rid, "taalm.retries", str(retries))
        self.study.client.set_tag(rid, "taalm.retry_reason", failure_reason(trial))
        self.study.client.set_tag(rid, RUNNING_TAG, f"{self._end_attempt(key):.1f}")  # the next attempt adds to it

    def on_trial_error(self, iteration, trials, trial, **info):
        key, rid = self._run(trial)
        reason = failure_reason(trial)
        self.study.client.set_tag(rid, "taalm.failure", reason)
        self._terminate(key, rid, "FAILED")


def failure_reason(trial) -> str:
    """One line saying why a trial failed (its last failure): what killed its process when something did (Ray's
    memory monitor, a lost node, a signal), else the last 'SomeError: message' line of its error
    (orchestrator/faults.py: describe_failure)."""
    from .faults import describe_failure

    text = ""
    try:  # Tune writes the error text next to the trial before it calls the callbacks
        if trial.error_file and Path(trial.error_file).is_file():
            text = Path(trial.error_file).read_text()
    except OSError:
        pass
    return describe_failure(text)


def error_line(text: str) -> str:
    """The last 'SomeError: message' line of an error's text (a traceback; or the tail of the text)."""
    import re

    text = text or "trial raised an error"
    found = re.findall(r"^\s*([A-Za-z_.]*(?:Error|Exception|Interrupt)\b[^\n]*)$", text, flags=re.M)
    return (found[-1].strip() if found else text.strip().splitlines()[-1])[:500]


def learning_curve_figure(curves: dict[str, dict[int, float]], title: str):
    """TO-LEARN and NOT-TO-FORGET accuracy per epoch (the paper's Figure 7 style)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not curves.get("to_learn_acc"):
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, style in (("to_learn_acc", "-o"), ("ntf_acc", "--s")):
        pts = sorted(curves.get(name, {}).items())
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, ms=3, label=name.replace("_", " "))
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
