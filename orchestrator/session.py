"""Opening and running a study, written once for every study kind (grids, searches, and what comes later).

:func:`open_study` does the start-up steps every study shares, in this order: the CPU check against the local
Ray instance, the injected faults (a testing hook), a stated memory larger than this machine, the study directory,
its tracking URI and ``study.json``, the driver's caches (in a thread), Ray and the MLflow side side by side, and
the study's saved view in MLflow. A kind hands it a :class:`StudyPlan` (what it read from its spec file, once).

:meth:`OpenStudy.run_stage` is the one stage runner (a grid's trials, its meta stage, a search): the Tuner
(orchestrator/tuning.py) with the study's MLflow callback and the progress view, Tune's run, and the error the
MLflow side raised while Tune started (an unreachable tracking server) shown instead of Tune's; :meth:`finish`
ends the study FAILED when every trial failed, else FINISHED.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .caches import Background, note_prepared, start_preparing
from .cluster import check_requests, check_storage, check_trial_cpus, stage_requests, waiting_notes
from .faults import injected_faults, install
from .local_ray import init_ray, local_cpus
from .logs import configure_output
from .placement import check_stated, plan_stage
from .mlflow_store import Study, default_tracking_uri
from .options import StudyOptions, StudyPlan
from .progress import Progress
from .specs import Resources, StudyRecord
from .storage import Storage
from .tracking import MlflowTrials
from .tuning import build_tuner, fit


class PendingStudy(Background):
    """The study's MLflow side (a :class:`Study`) being opened in a thread while Ray starts and Tune launches
    the first trials: using it waits for it (and re-raises its error). Pickled (Tune saves its callbacks as
    soon as it starts, and restores them on `taalm resume`), it is the Study once open, and until then the
    recipe that opens it again (the same experiment and study run, found by name)."""

    def __init__(self, uri: str, name: str, study_dir: Path, protocol: str, verbose: bool = False):
        self._recipe = (uri, name, study_dir, protocol)

        def open_store() -> Study:
            configure_output(study_dir, verbose, loggers=("mlflow", "alembic", "optuna"))
            study = Study(uri, name, study_dir, protocol)
            # the trials' learning-curve figures: matplotlib imported meanwhile, not when the first trial ends
            Background(_import_pyplot, "taalm-import-pyplot")
            return study

        super().__init__(open_store, "taalm-mlflow-start")

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.result(), name)

    def __reduce__(self):
        if not self._thread.is_alive() and "value" in self._box:
            return (_same, (self._box["value"],))
        return (Study, self._recipe)


def _import_pyplot() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401


def _same(x):
    return x


@dataclass
class OpenStudy:
    """A study whose start-up is done: its directory, MLflow side, Ray connection, and what it was given."""

    plan: StudyPlan
    options: StudyOptions
    study_dir: Path
    uri: str
    study: Any  # a PendingStudy: the Study once MLflow's side is open
    cpus: Optional[int]  # the local Ray instance's CPUs (None: a cluster)
    faults: dict
    storage: Storage  # where Tune's state, checkpoints, φ and the epoch-0 evaluations live
    waiting: list = field(default_factory=list)  # requests only a node the autoscaler may add would fit

    @property
    def progress(self) -> Progress:
        return self.options.progress

    def note(self, line: str) -> None:
        self.progress.note(line)

    def plan_memory(self, resources: Resources, need, stage: str) -> Resources:
        """The stage's resources with the concurrency memory allows and each trial's memory told to Ray's
        scheduler; the plan is said on the console, in the study log and as a tag of the study run."""
        fit_ = plan_stage(resources, need)
        line = f"{stage}: memory: {fit_.message}"
        logging.getLogger("ray.taalm").info("%s%s", line, f" [{need.describe()}]" if need else "")
        self.note(line)
        try:
            self.study.client.set_tag(self.study.parent_id, f"taalm.memory.{stage.split()[0]}", fit_.message[:500])
        except Exception:  # noqa: BLE001 (a tag is not worth stopping the study for)
            pass
        return resources.model_copy(update={"max_concurrent": fit_.fits,
                                            "memory_gb": round(fit_.request_gb, 3) if fit_.request_gb else None})

    def done_before(self, keys: list[str], role: str = "trial") -> set[str]:
        """The trial keys a resumed study had finished already (their MLflow runs are FINISHED)."""
        runs = self.study.client.search_runs([self.study.experiment_id], f"tags.`taalm.role` = '{role}'",
                                             max_results=5000)
        want = set(keys)
        return {r.data.tags.get("taalm.trial_key") for r in runs
                if r.info.status == "FINISHED" and r.data.tags.get("taalm.trial_key") in want}

    def run_stage(self, trainable, *, name: str, resources: Resources, info: dict, kind: str = "continual",
                  describe=None, **tuner_args):
        """One stage through the one Tuner builder: the study's MLflow callback (``info``: trial key -> run
        name, params, config, role, tags; ``describe``: the same for trials not known in advance) and the
        progress view as Tune callbacks; ``tuner_args``: param_space, search_alg, scheduler, num_samples, dirname.
        Returns Tune's results."""
        from ray import tune

        callbacks: list = [MlflowTrials(self.study, info, describe=describe)]
        if isinstance(self.progress, tune.Callback):
            callbacks.append(self.progress)
        tuner, guard = build_tuner(trainable, name=name, study_dir=self.study_dir, resources=resources,
                                   callbacks=callbacks, kind=kind, resume=self.options.resume,
                                   storage=self.storage, **tuner_args)
        try:
            with waiting_notes(self.waiting, self.note):
                return fit(tuner, guard, self.study_dir)
        except BaseException:
            # the MLflow side opened while Tune started: its error (an unreachable tracking server) is the one to
            # show, for every kind of study
            err = self.study.error() if isinstance(self.study, PendingStudy) else None
            if err is not None:
                raise err from None
            raise

    def finish(self, results, trials: Optional[int] = None) -> dict:
        """End the study: FAILED when every trial failed, else FINISHED. Returns what the CLI reports."""
        n = len(results) if trials is None else trials
        failed = sum(1 for r in results if r.error)
        self.study.finish("FAILED" if n and failed == n else "FINISHED")
        return {"study_dir": str(self.study_dir), "tracking_uri": self.uri, "experiment": self.plan.name,
                "trials": n, "failed": failed, "baseline": self.plan.baseline, "kind": self.plan.kind}


def open_study(plan: StudyPlan, options: StudyOptions) -> OpenStudy:
    """The start-up steps every study shares (module docstring). Nothing is written before the plan's bad input is
    refused: on a cluster, Ray is connected first and the storage and the trials' resource requests are checked
    against its nodes (exit 2 naming the key) before the study directory's files and the MLflow store are made;
    on this machine, Ray and the MLflow side start side by side."""
    o = options
    cpus = local_cpus(o.address, o.num_cpus, o.num_gpus)  # the local Ray instance's CPUs (None: a cluster)
    check_trial_cpus(plan.resources, cpus)
    faults = injected_faults(plan.labels)
    if plan.resources.memory_gb:
        check_stated(plan.resources, plan.where(("resources", "memory_gb")), local=o.address in (None, "local"))
    study_dir = Path(o.out_root) / plan.name
    storage = Storage.resolve(o.storage or plan.storage, study_dir,
                              "--storage" if o.storage else plan.where(("storage",)))
    waiting: list = []
    if cpus is None:  # a cluster: its nodes are known once attached
        configure_output(None, o.verbose, loggers=("ray",))  # the console stays quiet; the study log comes below
        how = init_ray(o.address, o.num_cpus, o.num_gpus)
        nodes = check_storage(storage, "--storage" if o.storage else plan.where(("storage",)))
        waiting = check_requests(stage_requests(plan.resources, plan.where, plan.has_meta, nodes), nodes)
    uri = o.tracking_uri or default_tracking_uri(study_dir)
    study_dir.mkdir(parents=True, exist_ok=True)
    StudyRecord(kind=plan.kind, protocol=plan.protocol, name=plan.name, source=str(Path(plan.source).resolve()),
                overrides=plan.overrides or [], tracking_uri=uri, out_root=str(Path(o.out_root).resolve()),
                baseline=plan.baseline, trials=plan.trials, storage=storage.uri).write(study_dir)
    prep = start_preparing(plan.configs, plan.meta_cfg, cpus)
    configure_output(study_dir, o.verbose, loggers=("ray",))  # before Ray logs anything (this machine)
    # the MLflow side in a thread while Ray's processes come up (or this process attaches to a local instance)
    study = PendingStudy(uri, plan.name, study_dir, plan.protocol, o.verbose)
    if cpus is not None:
        how = init_ray(o.address, o.num_cpus, o.num_gpus)
    install(o.verbose)  # a killed trial fails alone; Ray's error lines go to the study log (orchestrator/faults.py)
    o.progress.note(f"Ray: {how}")
    if not storage.local or cpus is None:
        o.progress.note(f"storage: {storage}")
    note_prepared(prep, o.progress)
    # the MLflow UI's view of the trials: summary metrics, then what the study varies and the seed
    study.save_trials_view(plan.view_params, plan.view_order)
    return OpenStudy(plan, o, study_dir, uri, study, cpus, faults, storage, waiting)
