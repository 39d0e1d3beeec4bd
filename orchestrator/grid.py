"""Ablation grids: a base run config plus axes, expanded into validated trials before anything starts.

    name: table9_token_weighting
    base: ../examples/run_smollm2_mini.yaml     # a run config file (relative to this file) ...
    overrides: {train.epochs: 5}                # ... and dotted overrides applied to it
    axes:                                       # cartesian product
      weighting.scheme: [uniform, oracle]
    zip:                                        # keys that vary together: one more product factor each
      - {train.lr: [1.0e-3, 3.0e-4], train.epochs: [5, 10], label: [fast, slow]}   # `label`: row names
    exclude:                                    # drop the combinations that match every key given
      - {weighting.scheme: oracle, train.lr: 3.0e-4}
    seeds: [0, 1]
    labels: {weighting.scheme: {uniform: Finetune, oracle: Oracle}}
    meta: {config: ../examples/meta_tiny.yaml, overrides: {}, per_seed: false}
    resources: {workers: 1, cpus_per_worker: 1, gpus_per_worker: 0, max_concurrent: 2}
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from trainables.config import (ConfigKeyError, RunConfig, apply_overrides, config_to_dict, flatten, load_yaml,
                               scheme_names, validate)
from trainables.configio import _where
from trainables.errors import InputError

from .specs import Resources


class MetaStage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    config: str  # a meta-training config file (relative to the grid file)
    overrides: dict[str, Any] = {}
    per_seed: bool = False  # one φ per grid seed (else one φ, seed of the meta config)


class GridSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    protocol: Literal["lama_ckl", "temporalwiki"] = "lama_ckl"
    base: Optional[str] = None
    overrides: dict[str, Any] = {}
    axes: dict[str, list[Any]] = {}
    zip: list[dict[str, list[Any]]] = []
    exclude: list[dict[str, Any]] = []
    seeds: list[int] = [0]
    labels: dict[str, dict[str, str]] = {}
    meta: Optional[MetaStage] = None
    resources: Resources = Resources()
    # where Tune's state, checkpoints, φ and the epoch-0 evaluations live: a path every node mounts, or a URI
    # (s3://bucket/prefix, gs://...); default: the study directory (one machine). --storage overrides it
    storage: Optional[str] = None
    # the row the report's paired differences are taken against (a method label; default "Finetune"
    # when there is one, else the first method)
    baseline: Optional[str] = None

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data):
        if isinstance(data, dict) and "reference" in data:
            raise ConfigKeyError(("reference",), "renamed to `baseline` (the method the report's paired "
                                                 "differences are taken against)")
        return data

    @field_validator("axes")
    @classmethod
    def _non_empty_axes(cls, v):
        for k, vals in v.items():
            if not vals:
                raise ValueError(f"axis {k!r} has no values")
        return v

    @field_validator("zip")
    @classmethod
    def _zip_lengths(cls, v):
        for group in v:
            lens = {k: len(vals) for k, vals in group.items()}
            if not group or len(set(lens.values())) != 1 or 0 in lens.values():
                raise ValueError(f"zipped keys must have equal, non-zero numbers of values: {lens}")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v):
        if not v or len(set(v)) != len(v):
            raise ValueError("seeds must be a non-empty list without repeats")
        return v


@dataclass
class Trial:
    key: str  # stable id: hash of the overrides and seed
    label: str  # the method name shown in reports
    seed: int
    overrides: dict[str, Any]  # the axis values of this trial (dotted keys)
    config: RunConfig
    needs_phi: bool = False


def _set(d: dict, dotted: str, value) -> None:
    apply_overrides(d, [f"{dotted}={json.dumps(value)}"])


def trial_key(overrides: dict, seed: int) -> str:
    blob = json.dumps({"overrides": overrides, "seed": seed}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def expand(spec: GridSpec) -> list[dict[str, Any]]:
    """The axis combinations (dicts of dotted key -> value) after product, zip and exclusions."""
    factors: list[list[dict]] = [[{k: v} for v in vals] for k, vals in spec.axes.items()]
    for group in spec.zip:
        n = len(next(iter(group.values())))
        factors.append([{k: vals[i] for k, vals in group.items()} for i in range(n)])
    combos = []
    for parts in itertools.product(*factors) if factors else [()]:
        combo: dict = {}
        for p in parts:
            combo.update(p)
        if any(all(combo.get(k, _MISSING) == v for k, v in ex.items()) for ex in spec.exclude):
            continue
        combos.append(combo)
    return combos


_MISSING = object()
LABEL = "label"  # in a zip group: the method name of each row (not a config key)


def _label(spec: GridSpec, combo: dict) -> str:
    parts = []
    if LABEL in combo:
        parts.append(str(combo[LABEL]))
    for k, v in combo.items():
        if k == LABEL or any(LABEL in g and k in g for g in spec.zip):
            continue
        named = spec.labels.get(k, {}).get(str(v))
        parts.append(named if named is not None else f"{k.split('.')[-1]}={v}")
    return " / ".join(parts) if parts else spec.name


def load_base(path: Path, lines: dict, base: Optional[str], overrides: dict, schema) -> tuple[dict, Path]:
    """The base run config of a grid or search space (validated in its own file), plus the spec's
    dotted overrides; returns (config dict, directory of the base file)."""
    data: dict = {}
    base_dir = path.parent
    if base:
        base_path = (path.parent / base).resolve()
        if not base_path.is_file():
            raise InputError(f"{path}:{lines.get(('base',), 1)} (base)", f"base config {base_path} not found")
        data, base_lines = load_yaml(base_path)
        validate(schema, copy.deepcopy(data), str(base_path), base_lines)
        base_dir = base_path.parent
    # nested and dotted keys merge key by key (`--set overrides.train.epochs=3` changes train.epochs only,
    # it does not replace the whole train section)
    for k, v in flatten(overrides).items():
        _set(data, k, v)
    return data, base_dir


@dataclass
class LoadedGrid:
    """A grid file read once: its spec, its trials (validated), the meta config, and where each key was set."""

    path: Path
    overrides: list[str]
    spec: GridSpec
    trials: list[Trial]
    meta_cfg: Optional[dict]
    lines: dict
    touched: set

    def where(self, loc: tuple) -> str:
        """``file:line (key)`` or ``--set key`` for a key path, for messages."""
        return _where(str(self.path), loc, self.lines, self.touched)


def load_grid(path: str | Path, overrides: list[str] | None = None) -> tuple[GridSpec, list[Trial], Optional[dict]]:
    """Read, validate and expand a grid; every trial's config is validated here, before any trial starts.
    Returns (spec, trials, meta config dict or None)."""
    g = read_grid(path, overrides)
    return g.spec, g.trials, g.meta_cfg


def read_grid(path: str | Path, overrides: list[str] | None = None) -> LoadedGrid:
    """:func:`load_grid`, with where each key was set."""
    path = Path(path)
    data, lines = load_yaml(path)
    touched = apply_overrides(data, overrides)
    spec = validate(GridSpec, data, str(path), lines, touched)
    schema = RunConfig
    if spec.protocol == "temporalwiki":
        from trainables.temporalwiki import TemporalWikiConfig

        schema = TemporalWikiConfig
    base, base_dir = load_base(path, lines, spec.base, spec.overrides, schema)
    combos = expand(spec)
    if not combos:
        raise InputError(f"{path} (exclude)", "the exclusions remove every trial")
    trials = []
    for combo in combos:
        for seed in spec.seeds:
            d = copy.deepcopy(base)
            for k, v in combo.items():
                if k != LABEL:
                    _set(d, k, v)
            d["seed"] = seed
            where_line = lines.get(("axes", next(iter(combo), "")), lines.get(("overrides",), 1))
            try:
                cfg = validate(schema, d, "", {}, set())
            except InputError as e:
                raise InputError(f"{path}:{where_line} ({e.where})",
                                 f"{e.message} [trial {json.dumps(combo, default=str)}, seed {seed}]") from None
            if spec.protocol == "temporalwiki":
                from trainables.temporalwiki import resolve_paths

                cfg = resolve_paths(cfg, base_dir)
            needs_phi = "train_attention" in scheme_names(cfg.weighting.scheme)
            settings = {k: v for k, v in combo.items() if k != LABEL}
            trials.append(Trial(trial_key(combo, seed), _label(spec, combo), seed, settings, cfg, needs_phi))
    labels = list(dict.fromkeys(t.label for t in trials))
    if spec.baseline is not None and spec.baseline not in labels:
        raise InputError(f"{path}:{lines.get(('baseline',), 1)} (baseline)",
                         f"{spec.baseline!r} is not a method of this grid (methods: {', '.join(labels)})")
    meta_cfg = None
    if spec.meta is not None or any(t.needs_phi and not t.config.weighting.train_attention.phi for t in trials):
        if spec.meta is None:
            raise InputError(f"{path} (meta)", "trials use train_attention without weighting.train_attention.phi: "
                                               "add a `meta:` stage (a meta-training config) or give a φ path")
        meta_path = (path.parent / spec.meta.config).resolve()
        if not meta_path.is_file():
            raise InputError(f"{path}:{lines.get(('meta', 'config'), 1)} (meta.config)", f"{meta_path} not found")
        from trainables.meta import MetaConfig

        mdata, mlines = load_yaml(meta_path)
        for k, v in flatten(spec.meta.overrides).items():
            _set(mdata, k, v)
        meta_cfg = config_to_dict(validate(MetaConfig, mdata, str(meta_path), mlines))
        if meta_cfg.get("records") and not Path(meta_cfg["records"]).is_absolute():
            meta_cfg["records"] = str((meta_path.parent / meta_cfg["records"]).resolve())
    return LoadedGrid(path, list(overrides or []), spec, trials, meta_cfg, lines, touched)


def headline(g: LoadedGrid) -> str:
    return (f"{len(g.trials)} trials ({len({t.label for t in g.trials})} methods x {len(g.spec.seeds)} seeds)"
            f"{' + meta-training stage' if g.meta_cfg else ''}")


def view_columns(g: LoadedGrid) -> tuple[list[str], Optional[tuple[str, bool]]]:
    """The MLflow view's parameter columns: what the grid varies, then the seed; sorted by the protocol's metric."""
    return list(dict.fromkeys(k for t in g.trials for k in t.overrides)) + ["seed"], None
