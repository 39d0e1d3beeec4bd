"""The search study kind: a search space (orchestrator/search_space.py) sampled by Optuna under Ray Tune.

Its row in orchestrator/kinds.py names search_space.py's :func:`read_search` (load), ``headline`` and
``view_columns`` (no Ray) and this module's :func:`run_space` (run and resume). The study's start-up, stage runner and final status are the grid's
(orchestrator/session.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from trainables.config import config_to_dict

from .memory import estimate_trial
from .mlflow_store import run_params
from .progress import Progress
from .search_space import (LoadedSearch, _sampler, _trial_config, define_by_run, label_of, largest_config,
                           read_search, view_columns)
from .options import StudyOptions, StudyPlan
from .session import OpenStudy, open_study
from .specs import Resources, TrialSpec

def search_driver(config: dict, base: dict, resources: dict, storage_path: str,
                  inject_fault: Optional[int] = None, storage: Optional[str] = None) -> None:
    """Tune trainable for searches: Optuna's sample -> a validated trial -> the same trial runner as grids."""
    from ray import tune

    from .ray_trainables import run_trial

    run_trial(TrialSpec(kind="continual", trial_key=tune.get_context().get_trial_id(), label=label_of(config),
                        config=config_to_dict(_trial_config(base, config)),
                        resources=Resources.model_validate(resources), storage_path=storage_path,
                        storage=storage, inject_fault=inject_fault))


def plan(s: LoadedSearch) -> StudyPlan:
    params, order = view_columns(s)
    return StudyPlan(kind="search", name=s.spec.name, source=s.path, overrides=s.overrides,
                     resources=s.spec.resources, where=s.where, configs=[_trial_config(s.base, {})], labels=None,
                     view_params=params, view_order=order, storage=s.spec.storage)


def run_space(s: LoadedSearch, options: StudyOptions) -> dict:
    """Run (or, ``options.resume``, continue) a search: Optuna's searcher through the study's stage runner, so
    retries (``resources.max_failures``), memory, stopping and the final status work as in a grid."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    spec, base = s.spec, s.base
    st = open_study(plan(s), options)
    metrics = [o.metric for o in spec.objectives]
    modes = [o.mode for o in spec.objectives]
    searcher = OptunaSearch(define_by_run(spec), metric=metrics if len(metrics) > 1 else metrics[0],
                            mode=modes if len(modes) > 1 else modes[0], sampler=_sampler(spec), seed=None)
    scheduler = None
    if spec.asha is not None:
        epochs = _trial_config(base, {}).train.epochs
        scheduler = ASHAScheduler(metric=spec.asha.metric, mode="max", time_attr="training_iteration",
                                  max_t=epochs + 1, grace_period=spec.asha.grace_period,
                                  reduction_factor=spec.asha.reduction_factor)

    def describe(trial) -> dict:
        sampled = {k: v for k, v in trial.config.items()}
        cfg = config_to_dict(_trial_config(base, sampled))
        return {"run_name": f"{trial.trial_id}: {label_of(sampled)}", "role": "trial", "config": cfg,
                "params": run_params(cfg, sampled, label=label_of(sampled), seed=cfg["seed"]),
                "tags": {"taalm.label": label_of(sampled), "taalm.seed": cfg["seed"]}}

    res = st.plan_memory(spec.resources, estimate_trial(largest_config(spec, base), spec.resources.runs_lean(),
                                                        spec.resources.keep_weights_gb), "trials")
    trainable = tune.with_parameters(search_driver, base=base, resources=res.model_dump(mode="json"),
                                     storage_path=st.storage.join("train"), storage=st.storage.uri,
                                     inject_fault=st.faults.get(None))
    st.progress.expect("trials", [], res.max_concurrent, total=spec.num_samples)
    results = st.run_stage(trainable, name=spec.name, resources=res, info={}, describe=describe,
                           search_alg=searcher, scheduler=scheduler, num_samples=spec.num_samples)
    if options.resume:
        _close_lost_trials(st)
    return st.finish(results)


def _close_lost_trials(st: OpenStudy) -> None:
    """A search's trial that a killed driver started less than a second before Tune last saved its experiment is
    not in the restored experiment (the restored searcher samples another in its place): its MLflow run, left
    RUNNING, ends KILLED with the reason."""
    study = st.study
    for r in study.client.search_runs([study.experiment_id],
                                      "tags.`taalm.role` = 'trial' and attributes.status = 'RUNNING'"):
        study.client.set_tag(r.info.run_id, "taalm.failure", "interrupted before Tune recorded the trial; the resumed "
                                                             "search sampled another in its place")
        study.client.set_terminated(r.info.run_id, "KILLED")


def run_search(path: str | Path, overrides: list[str] | None = None, out_root: str | Path = "runs",
               address: Optional[str] = None, tracking_uri: Optional[str] = None, progress=None,
               num_cpus: Optional[int] = None, verbose: bool = False, resume: bool = False,
               num_gpus: Optional[float] = None, storage: Optional[str] = None) -> dict:
    """Run (or resume) a search from its file (the library's entry point; the CLI reads the file once through
    orchestrator/kinds.py)."""
    s = read_search(path, overrides)  # validated before anything starts
    return run_space(s, StudyOptions(out_root=Path(out_root), address=address, tracking_uri=tracking_uri,
                                     num_cpus=num_cpus, num_gpus=num_gpus, verbose=verbose,
                                     progress=progress or Progress(), resume=resume, storage=storage))
