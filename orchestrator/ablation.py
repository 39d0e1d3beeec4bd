"""The grid study kind: an ablation grid (orchestrator/grid.py) run as Tune trials, after its meta stage.

Its row in orchestrator/kinds.py names grid.py's :func:`read_grid` (load), ``headline`` and ``view_columns`` (no
Ray: read before Ray is imported) and this module's :func:`run_grid` (run and resume).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from trainables.config import config_to_dict

from .grid import LoadedGrid, read_grid, view_columns
from .memory import estimate_trial
from .mlflow_store import run_params
from .progress import Progress
from .phi_stage import grid_stage, meta_label, meta_seeds, run_meta_stage
from .options import StudyOptions, StudyPlan
from .session import open_study
from .specs import TrialSpec


def _needed_meta(g: LoadedGrid) -> Optional[dict]:
    """The meta config, when some trial needs a φ from the meta stage (not a grid cut to rows without TAALM)."""
    if any(t.needs_phi and not t.config.weighting.train_attention.phi for t in g.trials):
        return g.meta_cfg
    return None


def plan(g: LoadedGrid) -> StudyPlan:
    spec, meta_cfg = g.spec, _needed_meta(g)
    meta_labels = [meta_label(s) for s in meta_seeds(spec, g.trials, meta_cfg)] if meta_cfg is not None else []
    params, order = view_columns(g)
    return StudyPlan(kind="grid", name=spec.name, source=g.path, overrides=g.overrides, resources=spec.resources,
                     where=g.where, configs=[t.config for t in g.trials],
                     labels=[t.label for t in g.trials] + meta_labels, protocol=spec.protocol, meta_cfg=meta_cfg,
                     baseline=spec.baseline, trials=[{"key": t.key, "label": t.label, "seed": t.seed}
                                                     for t in g.trials],
                     view_params=params, view_order=order, storage=spec.storage, has_meta=meta_cfg is not None)


def run_grid(g: LoadedGrid, options: StudyOptions) -> dict:
    """Run (or, ``options.resume``, continue) a grid: its meta stage, then its trials."""
    spec, trials = g.spec, g.trials
    p = plan(g)
    s = open_study(p, options)
    fetch: dict[str, str] = {}  # trial key -> the key of the φ it fetches from the storage
    if p.meta_cfg is not None:
        phis, phi_keys = run_meta_stage(s, spec, trials, p.meta_cfg)
        for t in trials:
            if t.needs_phi and not t.config.weighting.train_attention.phi:
                fetch[t.key] = phi_keys.get(t.seed, next(iter(phi_keys.values())))
                phi = phis.get(t.seed, next(iter(phis.values())))
                t.config = t.config.model_copy(update={"weighting": t.config.weighting.model_copy(
                    update={"train_attention": t.config.weighting.train_attention.model_copy(update={"phi": phi})})})
    info, specs = {}, []
    for order, t in enumerate(trials):
        cfg = config_to_dict(t.config)
        info[t.key] = {"run_name": f"{t.label} seed {t.seed}", "role": "trial", "config": cfg,
                       "params": run_params(cfg, t.overrides, label=t.label, seed=t.seed),
                       "tags": {"taalm.label": t.label, "taalm.seed": t.seed, "taalm.order": order}}
        specs.append(TrialSpec(kind="temporalwiki" if spec.protocol == "temporalwiki" else "continual",
                               trial_key=t.key, label=t.label, config=cfg, resources=spec.resources,
                               storage_path=s.storage.join("train"), storage=s.storage.uri,
                               phi_key=fetch.get(t.key),
                               inject_fault=s.faults.get(t.label)))
    estimates = [estimate_trial(x.config, lean=x.resources.runs_lean(), keep_weights_gb=x.resources.keep_weights_gb,
                                meta_cfg=p.meta_cfg) for x in specs]
    need = None if any(e is None for e in estimates) else max(estimates, key=lambda e: e.total)
    res = s.plan_memory(spec.resources, need, "trials")
    specs = [x.model_copy(update={"resources": res}) for x in specs]
    epochs = (lambda c: len(c["temporalwiki"]["periods"]) - 1) if spec.protocol == "temporalwiki" else \
        (lambda c: c["train"]["epochs"])
    s.progress.expect("trials", [(x.trial_key, f"{x.label} seed {x.config['seed']}", epochs(x.config))
                                 for x in specs], res.max_concurrent,
                      done_before=s.done_before([x.trial_key for x in specs]) if options.resume else None)
    results = grid_stage(s, specs, info, spec.name)
    return s.finish(results, len(specs))


def run_ablation(grid_path: str | Path, overrides: list[str] | None = None, out_root: str | Path = "runs",
                 address: Optional[str] = None, tracking_uri: Optional[str] = None, progress=None,
                 num_cpus: Optional[int] = None, resume: bool = False, retrain_phi: bool = False,
                 verbose: bool = False, num_gpus: Optional[float] = None, storage: Optional[str] = None) -> dict:
    """Run (or resume) an ablation grid from its file (the library's entry point; the CLI reads the file once
    through orchestrator/kinds.py). ``progress``: an orchestrator.progress.Progress, e.g. the CLI's StudyConsole."""
    g = read_grid(grid_path, overrides)  # everything validated before anything starts
    return run_grid(g, StudyOptions(out_root=Path(out_root), address=address, tracking_uri=tracking_uri,
                                    num_cpus=num_cpus, num_gpus=num_gpus, verbose=verbose,
                                    progress=progress or Progress(), resume=resume, retrain_phi=retrain_phi,
                                    storage=storage))
