"""MLflow tracking of a study: one experiment, a parent run (taalm.role=study), a child run per trial.

All MLflow writes happen in the Tune driver process through a Tune callback, so concurrent trials
never write to the store at the same time; a child run is found again by its trial key, and epochs
already logged are not logged twice (a resumed study neither loses nor duplicates anything).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from ray import tune

from trainables.config import flatten
from trainables.loop import UNIT

SUMMARY = ("top_acc", "top_epoch", "nf_acc", "total_knowledge", "avg_changed_ppl", "avg_unchanged_ppl")
CURVES = ("to_learn_acc", "ntf_acc", "to_learn_em", "ntf_em", "train_loss", "mean_weight", "changed_ppl",
          "unchanged_ppl")
CHECKS = ("val_acc", "object_weight_ratio", "object_weight_share", "uniform_share")  # meta-training's checks


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

    def __init__(self, tracking_uri: str, name: str, study_dir: Path, protocol: str = "lama_ckl"):
        from mlflow.tracking import MlflowClient

        self.uri, self.name, self.dir = tracking_uri, name, study_dir
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
            self.parent_id = self.client.create_run(self.experiment_id, run_name=name, tags={
                "taalm.role": "study", "taalm.protocol": protocol, "taalm.code_version": code_version()}).info.run_id

    def __getstate__(self):
        # Tune pickles its callbacks with the experiment state: keep ids, rebuild the client on load
        return {k: v for k, v in self.__dict__.items() if k != "client"}

    def __setstate__(self, state):
        from mlflow.tracking import MlflowClient

        self.__dict__.update(state)
        self.client = MlflowClient(self.uri)

    def child(self, key: str, run_name: str, role: str, params: dict, tags: dict) -> str:
        found = self.client.search_runs(
            [self.experiment_id], f"tags.`taalm.trial_key` = '{key}' and tags.`taalm.role` = '{role}'", max_results=5)
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags={
            "mlflow.parentRunId": self.parent_id, "taalm.role": role, "taalm.trial_key": key,
            "taalm.code_version": code_version(), **{k: str(v) for k, v in tags.items()}})
        from mlflow.entities import Param

        items = [Param(k, str(v)[:500]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run.info.run_id, params=items[i:i + 100])
        return run.info.run_id

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.parent_id, status=status)


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

    def _run(self, trial) -> tuple[str, str]:
        key = trial.config["t"]["trial_key"] if "t" in trial.config else trial.trial_id
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
        self._log_step(key, rid, step, result)
        if isinstance(result.get("per_fact"), dict):
            pf["uuids"].update(result["per_fact"].get("uuids") or {})
            for name in ("to_learn", "ntf"):
                if isinstance(result["per_fact"].get(name), list):
                    pf[name][step] = result["per_fact"][name]
        if isinstance(result.get("node_id"), str) and key not in self.placed:
            self.placed.add(key)
            self.study.client.set_tag(rid, "taalm.node_id", result["node_id"])
            self.study.client.set_tag(rid, "taalm.pid", str(result.get("pid")))
        resumed = result.get("resumed_from")
        if isinstance(resumed, (int, float)) and resumed >= 0 and self.resumed.get(key) != resumed:
            # an attempt that continued from a checkpoint (a retry or `taalm resume`)
            self.resumed[key] = resumed
            self.study.client.set_tag(rid, f"taalm.resumed_from_{UNIT.get(result.get('kind'), 'epoch')}",
                                      str(int(resumed)))

    def _log_step(self, key: str, rid: str, step: int, values: dict) -> None:
        """Log one report (step = its index) of a trial's curves, unless it is already in MLflow."""
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
        self.study.client.log_batch(rid, metrics=metrics)
        self.logged[key].add(step)

    def on_trial_complete(self, iteration, trials, trial, **info):
        from mlflow.entities import Metric

        key, rid = self._run(trial)
        meta = self.info[key]
        last = trial.last_result or {}
        now = int(time.time() * 1000)
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
        self.study.client.set_terminated(rid, status="FINISHED")

    def on_trial_recover(self, iteration, trials, trial, **info):
        """A failed trial that Tune will retry (resources.max_failures): count it, keep the reason."""
        key, rid = self._run(trial)
        run = self.study.client.get_run(rid)
        retries = int(run.data.tags.get("taalm.retries", "0")) + 1
        self.study.client.set_tag(rid, "taalm.retries", str(retries))
        self.study.client.set_tag(rid, "taalm.retry_reason", failure_reason(trial))

    def on_trial_error(self, iteration, trials, trial, **info):
        key, rid = self._run(trial)
        reason = failure_reason(trial)
        self.study.client.set_tag(rid, "taalm.failure", reason)
        self.study.client.set_terminated(rid, status="FAILED")


def failure_reason(trial) -> str:
    """The last 'SomeError: message' line of a failed trial's error (or the tail of its text)."""
    import re

    text = ""
    try:  # Tune writes the error text next to the trial before it calls the callbacks
        if trial.error_file and Path(trial.error_file).is_file():
            text = Path(trial.error_file).read_text()
    except OSError:
        pass
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
