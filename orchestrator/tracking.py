"""MLflow tracking of a study's trials, as a Tune callback (the store itself: orchestrator/mlflow_store.py).

All MLflow writes happen in the Tune driver process through :class:`MlflowTrials`, so concurrent trials never
write to the store at the same time; a child run is found again by its trial key, and epochs already logged are
not logged twice (a resumed study neither loses nor duplicates anything).
"""

from __future__ import annotations

import time
from pathlib import Path

from ray import tune

from trainables.loop import UNIT

from .faults import failure_reason, retry_line
from .mlflow_store import RUNNING_TAG, Study, terminate
from .storage import Storage, fetch_phi, phi_trained

SUMMARY = ("top_acc", "top_epoch", "nf_acc", "total_knowledge", "avg_changed_ppl", "avg_unchanged_ppl")
CURVES = ("to_learn_acc", "ntf_acc", "to_learn_em", "ntf_em", "train_loss", "mean_weight", "changed_ppl",
          "unchanged_ppl", "micro_batch_size")
PLACEMENT = ("node_id", "pid", "device", "gpu_ids", "gpu_share", "device_note")  # tagged once per driver
CHECKS = ("val_acc", "object_weight_ratio", "object_weight_share", "uniform_share")  # meta-training's checks


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
        """An attempt of the trial runs since ``began`` (not before its run's start: a run created for this
        attempt starts a few ms after ``began``, and its end is its start plus its running time), unless one is
        running already."""
        if key not in self.recorded:
            run = self.study.client.get_run(rid)
            self.recorded[key] = float(run.data.tags.get(RUNNING_TAG, 0) or 0)
            self.start_ms[key] = run.info.start_time
        if self.attempt_start.get(key) is None:
            self.attempt_start[key] = max(began, self.start_ms[key] / 1000)

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
            planned = (meta["config"].get("train") or {}).get("epochs")
            reached = max(self.curves[key].get("to_learn_acc") or {}, default=None)
            if last.get("kind") == "epoch" and isinstance(planned, int) and reached is not None and reached < planned:
                # completed before its last epoch: the search's scheduler (ASHA) stopped it there (Tune: TERMINATED)
                self.study.client.set_tag(rid, "taalm.stopped_after_epoch", str(reached))
                self.study.client.set_tag(rid, "taalm.stopped_early", f"by the scheduler (ASHA) after epoch "
                                                                      f"{reached} of {planned}")
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
            if meta.get("phi") and not phi_trained(phi.parent):  # trained on another node: from the storage
                uri, phi_key, local = meta["phi"]
                try:
                    fetch_phi(Storage(uri), phi_key, Path(local))
                except OSError as e:  # the artifacts are a copy: the study goes on without them
                    import logging

                    logging.getLogger("ray.taalm").warning("φ's files not logged to MLflow: %s", e)
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
        self.study.client.set_tag(rid, "taalm.retry_reason", retry_line(trial, failure_reason(trial)))
        self.study.client.set_tag(rid, RUNNING_TAG, f"{self._end_attempt(key):.1f}")  # the next attempt adds to it

    def on_trial_error(self, iteration, trials, trial, **info):
        key, rid = self._run(trial)
        reason = failure_reason(trial)
        self.study.client.set_tag(rid, "taalm.failure", reason)
        self._terminate(key, rid, "FAILED")


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

