"""Search spaces (search_spaces/*.yaml), read and checked once: the spec, Optuna's define-by-run function
(conditional parameters), each sampled trial's config. Run by orchestrator/search.py: Ray Tune with OptunaSearch
(TPE by default; NSGA-II for the multi-objective plasticity-stability front), optional ASHA pruning on the
per-epoch TO-LEARN accuracy.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from trainables.config import RunConfig, apply_overrides, config_to_dict, load_yaml, validate
from trainables.errors import InputError

from trainables.configio import _where

from .grid import load_base
from .memory import estimate_trial
from .specs import Resources


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
    # where Tune's state, checkpoints, φ and the epoch-0 evaluations live: a path every node mounts, or a URI
    # (s3://bucket/prefix, gs://...); default: the study directory (one machine). --storage overrides it
    storage: Optional[str] = None

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


@dataclass
class LoadedSearch:
    """A search-space file read once: its spec, the base config, and where each key was set."""

    path: Path
    overrides: list[str]
    spec: SearchSpec
    base: dict
    lines: dict
    touched: set

    def where(self, loc: tuple) -> str:
        return _where(str(self.path), loc, self.lines, self.touched)


def load_search(path: str | Path, overrides: list[str] | None = None) -> tuple[SearchSpec, dict]:
    s = read_search(path, overrides)
    return s.spec, s.base


def read_search(path: str | Path, overrides: list[str] | None = None) -> LoadedSearch:
    """Read and validate a search space; every parameter's corner values are checked on a real trial config."""
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
    return LoadedSearch(path, list(overrides or []), spec, base, lines, touched)


def largest_config(spec: SearchSpec, base: dict) -> dict:
    """The base config with every searched parameter at the value that needs the most memory (each chosen alone,
    then all together): what the study plans memory for (orchestrator/memory.py)."""
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


SUMMARY_METRICS = ("top_acc", "nf_acc", "total_knowledge")


def headline(s: LoadedSearch) -> str:
    return (f"{s.spec.num_samples} trials, objectives "
            f"{', '.join(o.metric + ' ' + o.mode for o in s.spec.objectives)}")


def view_columns(s: LoadedSearch) -> tuple[list[str], Optional[tuple[str, bool]]]:
    """The searched keys and the seed, sorted by the first objective when it is a summary metric."""
    first = s.spec.objectives[0]
    return list(s.spec.space) + ["seed"], ((first.metric, first.mode == "min")
                                           if first.metric in SUMMARY_METRICS else None)
