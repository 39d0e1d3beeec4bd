"""The meta stage of a grid: φ (Train-Attention) meta-trained once (or per seed) before the TAALM trials, kept in
a cache keyed by what it trains on which data, or seeded from a φ shipped in ablations/phi/.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

from trainables.config import config_to_dict

from .faults import error_line
from .grid import GridSpec, Trial
from .memory import estimate_meta
from .mlflow_store import meta_params
from .ray_trainables import trial_driver
from .session import OpenStudy
from .specs import TrialSpec
from .storage import phi_published, phi_trained, publish_phi


def phi_cache_dir(meta_cfg: dict) -> Path:
    from trainables.models import cache_dir

    digest = hashlib.sha256(json.dumps(meta_cfg, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "phi" / digest


SHIPPED_PHI = Path(__file__).resolve().parents[1] / "ablations" / "phi"


# how φ is computed, not what: the device, and running the meta-batch vmapped, in groups or one example at a
# time (the same mathematics; tests/test_meta.py: equal to 1e-8 in float64). Not part of φ's identity.
EXECUTION_KEYS = (("device",), ("meta", "batching"), ("meta", "vmap_chunk"))


def _normalised_meta(cfg) -> Optional[dict]:
    """What a meta config trains, as the current schema reads it (keys added since it was written take their
    defaults; the execution options are dropped), or None if it no longer validates."""
    from pydantic import ValidationError

    from trainables.meta import MetaConfig

    try:
        d = config_to_dict(MetaConfig.model_validate(cfg))
    except (ValidationError, TypeError):
        return None
    for *parents, key in EXECUTION_KEYS:
        section = d
        for name in parents:
            section = section.get(name, {})
        section.pop(key, None)
    return d


def shipped_phi(cfg: dict, data_hash: str) -> Optional[Path]:
    """A φ shipped with the project (``ablations/phi/*/``) that was meta-trained with exactly this meta
    config on this data, or None. Both configs are compared as the current schema reads them, so an option
    added later with a default (e.g. meta.vmap_chunk) does not orphan a shipped φ."""
    want = _normalised_meta(cfg)
    for meta_file in sorted(SHIPPED_PHI.glob("*/phi.json")):
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if meta.get("data_hash") == data_hash and want is not None and _normalised_meta(meta.get("meta_config")) == want:
            return meta_file.parent
    return None


def _seed_phi_cache(src: Path, d: Path) -> None:
    """Copy a shipped φ (and its meta_metrics.json, heatmap.html) into the φ cache directory ``d``."""
    import shutil

    from trainables.checkpoint import atomic_directory

    with atomic_directory(d / "phi") as tmp:
        for f in ("phi.json", "phi.safetensors"):
            shutil.copy2(src / f, tmp / f)
    for f in ("meta_metrics.json", "heatmap.html"):
        if (src / f).is_file():
            shutil.copy2(src / f, d / f)


def meta_data_hash(meta_cfg: dict) -> str:
    """The hash of the data a meta config trains φ on (its records file, or LAMA-CKL)."""
    from trainables.data import data_hash as hash_files, load_lama

    if meta_cfg.get("records"):
        return hash_files([Path(meta_cfg["records"])])
    return load_lama(meta_cfg["data"].get("dir")).hash


def phi_location(meta_cfg: dict, seed: int, data_hash: str) -> tuple[str, Path]:
    """(the meta trial's key, φ's cache directory) for a meta config at a seed: where the meta stage puts φ."""
    raw = dict(meta_cfg, seed=seed)
    cfg = _normalised_meta(raw) or raw  # φ's identity: what is trained, on which data
    key = "meta-" + hashlib.sha256(json.dumps([cfg, data_hash], sort_keys=True).encode()).hexdigest()[:10]
    return key, phi_cache_dir({"cfg": cfg, "data_hash": data_hash})


def _clear_phi_cache(d: Path) -> None:
    import shutil

    for name in ("phi", "checkpoint"):
        shutil.rmtree(d / name, ignore_errors=True)
    (d / "meta_metrics.json").unlink(missing_ok=True)


def meta_seeds(spec: GridSpec, trials: list[Trial], meta_cfg: dict) -> list[int]:
    """The seeds φ is meta-trained with: one per grid seed of the trials that use it (``meta.per_seed``), else the
    meta config's own."""
    return sorted({t.seed for t in trials if t.needs_phi}) if spec.meta.per_seed else [meta_cfg["seed"]]


def meta_label(seed: int) -> str:
    return f"meta-train seed {seed}"


def grid_stage(s: OpenStudy, specs: list[TrialSpec], info: dict, name: str):
    """A grid's stage (its trials, or the meta stage) through the study's stage runner; the stage's resources are
    those of its trials (``specs[0].resources``: planned for memory)."""
    from ray import tune

    return s.run_stage(trial_driver, name=name, resources=specs[0].resources, info=info, kind=specs[0].kind,
                       param_space={"t": tune.grid_search([x.model_dump(mode="json") for x in specs])},
                       dirname=lambda t: f"{t.config['t']['trial_key']}")


def run_meta_stage(s: OpenStudy, spec: GridSpec, trials: list[Trial], meta_cfg: dict
                   ) -> tuple[dict[int, str], dict[int, str]]:
    """Train φ (per seed or once), reusing a cached φ keyed by its config (which holds the data choice);
    a φ shipped in ablations/phi/ for exactly that config and data seeds the cache. ``--retrain-phi``: train
    anew, ignoring the cache and the shipped φ. An interrupted meta-training continues from its checkpoint
    (φ's cache directory, or the one Tune hands back to a retried trial).

    φ travels through the study's storage (``phi/<key>``, orchestrator/storage.py): the meta trial publishes it
    there from whichever node trained it; a φ this machine's cache (or ablations/phi/) has is published from
    here; each TAALM trial fetches it into its own node's cache. Returns (seed -> φ's path in this machine's cache,
    seed -> φ's key in the storage)."""
    from .cluster import alive_nodes, meta_cpu_request

    retrain, cpus, study, storage = s.options.retrain_phi, s.cpus, s.study, s.storage
    data_hash = meta_data_hash(meta_cfg)
    phis, keys, todo, info, meta_cpus = {}, {}, [], {}, None
    for seed in meta_seeds(spec, trials, meta_cfg):
        cfg = dict(meta_cfg, seed=seed)
        key, d = phi_location(meta_cfg, seed, data_hash)
        phis[seed], keys[seed] = str(d / "phi"), d.name
        info[key] = {"run_name": meta_label(seed), "role": "meta", "params": meta_params(cfg), "config": cfg,
                     "tags": {"taalm.phi_dir": str(d / "phi"), "taalm.phi_storage": storage.join("phi", d.name),
                              "taalm.data_hash": data_hash},
                     "phi": (storage.uri, d.name, str(d))}  # where the driver finds φ's files for MLflow
        if retrain:  # anew: neither the cached φ nor a half-trained one's checkpoint, nor the published one
            _clear_phi_cache(d)
            storage.delete("phi", d.name)
        elif phi_published(storage, d.name):
            continue
        shipped = None if retrain or phi_trained(d) else shipped_phi(cfg, data_hash)
        if shipped is not None:
            _seed_phi_cache(shipped, d)
            study.client.set_tag(study.parent_id, f"taalm.phi_seed{seed}", f"shipped: {shipped}")
            for f in ("phi.json", "meta_metrics.json", "heatmap.html"):  # what φ is, beside the study
                if (shipped / f).is_file():
                    study.client.log_artifact(study.parent_id, str(shipped / f), f"phi_seed{seed}")
        if phi_trained(d):
            publish_phi(storage, d.name, d)
            continue
        # not yet, or interrupted: the meta trial continues from its node's checkpoint (or Tune's, when retried)
        if meta_cpus is None:  # the same for every seed: the nodes asked once
            meta_cpus = meta_cpu_request(spec.resources, cpus, alive_nodes() if cpus is None else None)
        todo.append(TrialSpec(kind="meta", trial_key=key, label=meta_label(seed), config=cfg, phi_dir=str(d),
                              phi_key=d.name, storage=storage.uri, storage_path=storage.join("train"),
                              inject_fault=s.faults.get(meta_label(seed)),
                              resources=spec.resources.model_copy(update={
                                  "workers": 1, "cpus_per_worker": meta_cpus,
                                  "torch_threads": max(1, int(meta_cpus))})))
    if todo:
        res = s.plan_memory(todo[0].resources.model_copy(update={"max_concurrent": 1, "memory_gb": None}),
                            estimate_meta(meta_cfg), "meta-training φ")
        s.note(f"meta-training φ: {len(todo)} trial(s) of {res.cpus_per_worker:g} CPU(s)"
               + (f" and {res.gpus_per_worker:g} GPU(s)" if res.gpus_per_worker else "") + " each")
        todo = [t.model_copy(update={"resources": res}) for t in todo]
        s.progress.expect("meta-training φ", [(t.trial_key, t.label, None) for t in todo], 1)
        results = grid_stage(s, todo, info, f"{spec.name}-meta")
        errors = [r.error for r in results if r.error]
        if errors:
            raise RuntimeError(f"meta-training failed: {error_line(str(errors[0]))}")
        missing = [t.label for t in todo if not phi_published(storage, t.phi_key)]
        if missing:
            raise RuntimeError(f"meta-training ended without φ in the storage {storage} ({', '.join(missing)})")
    return phis, keys
