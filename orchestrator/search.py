"""Search spaces (search_spaces/*.yaml) -> Optuna (define-by-run, so conditional parameters work)
-> Ray Tune with OptunaSearch (TPE by default; NSGA-II for the multi-objective plasticity-stability
front), optional ASHA pruning on the per-epoch TO-LEARN accuracy.

    name: lr_rank
    base: ../examples/run_tiny.yaml
    overrides: {train.epochs: 3}
    num_samples: 8
    objectives: [{metric: top_acc, mode: max}]          # two objectives -> NSGA-II by default
    sampler: tpe                                        # tpe | nsga2 | random
    space:
      train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
      params.r: {type: int, low: 4, high: 32, step: 4}
      weighting.scheme: {type: categorical, choices: [uniform, rho1]}
      weighting.rho1.k: {type: float, low: 0.3, high: 0.8, when: {weighting.scheme: rho1}}
    asha: {grace_period: 1, reduction_factor: 2}
    resources: {workers: 1, cpus_per_worker: 1, max_concurrent: 2}
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from trainables.config import RunConfig, apply_overrides, config_to_dict, load_yaml, validate
from trainables.errors import InputError

from .grid import load_base
from .specs import Resources, StudyRecord, TrialSpec


class Param(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["float", "int", "categorical"]
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    step: Optional[float] = None
    choices: Optional[list[Union[str, int, float, bool]]] = None
    when: dict[str, Any] = {}  # conditional: sampled only when these (earlier) parameters have these values

    @model_validator(mode="after")
    def _check(self):
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical needs a non-empty `choices` list")
        else:
            if self.low is None or self.high is None or not self.low < self.high:
                raise ValueError(f"{self.type} needs low < high")
            if self.log and self.low <= 0:
                raise ValueError("log scale needs low > 0")
        return self


class Objective(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metric: Literal["top_acc", "nf_acc", "total_knowledge", "to_learn_acc", "ntf_acc"]
    mode: Literal["max", "min"] = "max"


class Asha(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1)
    metric: Literal["to_learn_acc", "ntf_acc"] = "to_learn_acc"


class SearchSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    base: Optional[str] = None
    overrides: dict[str, Any] = {}
    space: dict[str, Param]
    objectives: list[Objective] = [Objective(metric="total_knowledge")]
    sampler: Optional[Literal["tpe", "nsga2", "random"]] = None
    num_samples: int = Field(8, ge=1)
    seed: int = 0  # sampler seed
    asha: Optional[Asha] = None
    resources: Resources = Resources()

    @model_validator(mode="after")
    def _check(self):
        if not self.space:
            raise ValueError("`space` must name at least one parameter")
        if not 1 <= len(self.objectives) <= 2:
            raise ValueError("one or two objectives")
        names = list(self.space)
        for i, (k, p) in enumerate(self.space.items()):
            for dep in p.when:
                if dep not in names[:i]:
                    raise ValueError(f"space.{k}.when refers to {dep!r}, which must be a parameter listed before it")
        return self


def _sampler(spec: SearchSpec):
    import optuna

    kind = spec.sampler or ("nsga2" if len(spec.objectives) > 1 else "tpe")
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=spec.seed)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=spec.seed)
    return optuna.samplers.TPESampler(seed=spec.seed)


class DefineByRun:
    """The Optuna define-by-run function of a spec (conditional parameters via `when`); a module-level
    class so Tune can checkpoint the searcher."""

    def __init__(self, spec: SearchSpec):
        self.items = [(k, p.model_dump()) for k, p in spec.space.items()]

    def __call__(self, trial) -> None:
        chosen: dict[str, Any] = {}
        for key, p in self.items:
            if any(chosen.get(d, object()) != v for d, v in p["when"].items()):
                continue
            if p["type"] == "categorical":
                chosen[key] = trial.suggest_categorical(key, p["choices"])
            elif p["type"] == "int":
                chosen[key] = trial.suggest_int(key, int(p["low"]), int(p["high"]), step=int(p["step"] or 1),
                                                log=p["log"])
            else:
                chosen[key] = trial.suggest_float(key, p["low"], p["high"], log=p["log"], step=p["step"])
        return None


def define_by_run(spec: SearchSpec) -> DefineByRun:
    return DefineByRun(spec)


def _trial_config(base: dict, sampled: dict) -> RunConfig:
    d = copy.deepcopy(base)
    for k, v in sampled.items():
        apply_overrides(d, [f"{k}={json.dumps(v)}"])
    return validate(RunConfig, d)


def load_search(path: str | Path, overrides: list[str] | None = None) -> tuple[SearchSpec, dict]:
    path = Path(path)
    data, lines = load_yaml(path)
    touched = apply_overrides(data, overrides)
    spec = validate(SearchSpec, data, str(path), lines, touched)
    base, _ = load_base(path, lines, spec.base, spec.overrides, RunConfig)
    # every parameter must land on a real config key with an admissible value: check the corners now
    for key, p in spec.space.items():
        values = p.choices if p.type == "categorical" else [p.low, p.high]
        for v in values:
            v = int(v) if p.type == "int" else v
            try:
                _trial_config(base, {**{d: w for d, w in p.when.items()}, key: v})
            except InputError as e:
                raise InputError(f"{path}:{lines.get(('space', key), 1)} (space.{key})",
                                 f"value {v!r}: {e.where}: {e.message}") from None
    return spec, base


def search_driver(config: dict, base: dict, resources: dict, storage_path: str,
                  inject_fault: Optional[int] = None) -> None:
    """Tune trainable for searches: Optuna's sample -> a validated trial -> the same trial runner as grids."""
    from ray import tune

    from .ray_trainables import run_trial

    run_trial(TrialSpec(kind="continual", trial_key=tune.get_context().get_trial_id(), label=label_of(config),
                        config=config_to_dict(_trial_config(base, config)),
                        resources=Resources.model_validate(resources), storage_path=storage_path,
                        inject_fault=inject_fault))


def largest_config(spec: SearchSpec, base: dict) -> dict:
    """The base config with every searched parameter at the value that needs the most memory (each chosen alone,
    then all together): what the study plans memory for (orchestrator/memory.py)."""
    from .memory import estimate_trial

    def need(d: dict) -> float:
        e = estimate_trial(d, spec.resources.runs_lean(), spec.resources.keep_weights_gb)
        return e.total if e else 0.0

    def with_value(d: dict, key: str, v) -> dict:
        d = copy.deepcopy(d)
        apply_overrides(d, [f"{key}={json.dumps(v)}"])
        return d

    full = config_to_dict(_trial_config(base, {}))
    chosen = copy.deepcopy(full)
    for key, p in spec.space.items():
        values = p.choices if p.type == "categorical" else [p.low, p.high]
        values = [int(v) if p.type == "int" else v for v in values]
        best = max(values, key=lambda v: need(with_value(full, key, v)))
        chosen = with_value(chosen, key, best)
    return chosen


def label_of(sampled: dict) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                     for k, v in sorted(sampled.items()))


def run_search(path: str | Path, overrides: list[str] | None = None, out_root: str | Path = "runs",
               address: Optional[str] = None, tracking_uri: Optional[str] = None, progress=None,
               num_cpus: Optional[int] = None, verbose: bool = False, resume: bool = False,
               num_gpus: Optional[float] = None) -> dict:
    """Run (or, ``resume``, continue) a search: Optuna's searcher under the study's one Tuner builder
    (orchestrator/tuning.py), so retries (``resources.max_failures``), memory and stopping work as in a grid."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from .memory import check_stated, estimate_trial
    from .ray_trainables import injected_faults
    from .study import (check_trial_cpus, local_cpus, note_prepared, plan_memory, start_preparing, start_study,
                        stated_memory_where)
    from .tracking import MlflowTrials, default_tracking_uri, run_params
    from .tuning import build_tuner, fit

    spec, base = load_search(path, overrides)  # validated before anything starts
    cpus = local_cpus(address, num_cpus, num_gpus)  # the local Ray instance's CPUs (None: a cluster)
    check_trial_cpus(spec.resources, cpus)
    fault = injected_faults(None).get(None)
    if spec.resources.memory_gb:
        check_stated(spec.resources, stated_memory_where(path, overrides), local=address in (None, "local"))
    study_dir = Path(out_root) / spec.name
    study_dir.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri or default_tracking_uri(study_dir)
    StudyRecord(kind="search", name=spec.name, source=str(Path(path).resolve()), overrides=overrides or [],
                tracking_uri=uri, out_root=str(Path(out_root).resolve())).write(study_dir)
    prep = start_preparing([_trial_config(base, {})], None, cpus)
    study = start_study(study_dir, uri, spec.name, "lama_ckl", address, num_cpus, verbose, progress, num_gpus)
    note_prepared(prep, progress)
    first = spec.objectives[0]
    # the MLflow UI's view of the trials: summary metrics, then the searched keys and the seed, sorted by the
    # first objective when it is a summary metric
    study.save_trials_view(list(spec.space) + ["seed"], (first.metric, first.mode == "min")
                           if first.metric in ("top_acc", "nf_acc", "total_knowledge") else None)
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

    res = plan_memory(spec.resources, estimate_trial(largest_config(spec, base), spec.resources.runs_lean(),
                                                     spec.resources.keep_weights_gb), progress, study, "trials")
    storage = str((study_dir / "train").resolve())
    trainable = tune.with_parameters(search_driver, base=base, resources=res.model_dump(mode="json"),
                                     storage_path=storage, inject_fault=fault)
    tuner, guard = build_tuner(trainable, name=spec.name, study_dir=study_dir, resources=res,
                               callbacks=[MlflowTrials(study, {}, describe=describe)] + ([progress] if progress else []),
                               search_alg=searcher, scheduler=scheduler, num_samples=spec.num_samples, resume=resume)
    if hasattr(progress, "expect"):
        progress.expect("trials", [], res.max_concurrent)
        progress.total = spec.num_samples
    results = fit(tuner, guard, study_dir)
    failed = sum(1 for r in results if r.error)
    if resume:
        _close_lost_trials(study)
    study.finish()
    return {"study_dir": str(study_dir), "tracking_uri": uri, "experiment": spec.name,
            "trials": len(results), "failed": failed}


def _close_lost_trials(study) -> None:
    """A search's trial that a killed driver started less than a second before Tune last saved its experiment is
    not in the restored experiment (the restored searcher samples another in its place): its MLflow run, left
    RUNNING, ends KILLED with the reason."""
    for r in study.client.search_runs([study.experiment_id],
                                      "tags.`taalm.role` = 'trial' and attributes.status = 'RUNNING'"):
        study.client.set_tag(r.info.run_id, "taalm.failure", "interrupted before Tune recorded the trial; the resumed "
                                                             "search sampled another in its place")
        study.client.set_terminated(r.info.run_id, "KILLED")

