"""Assembling and running a study: validate -> expand -> (meta-training stage) -> Ray Tune -> MLflow."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Optional

from trainables.config import ModelConfig, config_to_dict
from trainables.errors import InputError

from .grid import GridSpec, Trial, load_grid
from .specs import StudyRecord, TrialSpec
from .tracking import MlflowTrials, Study, default_tracking_uri, meta_params, run_params


LOOPBACK = ("127.0.0.1", "localhost")


def _keep_loopback() -> None:
    """Let Ray use 127.0.0.1 as a node address. Ray rewrites 127.0.0.1 to the machine's outward address
    unless its single-machine switch is set; that switch is read once, at import, so it is set both in the
    environment (for the raylet, workers and job drivers started from here) and in this process."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def init_ray(address: Optional[str], num_cpus: Optional[int] = None,
             num_gpus: Optional[float] = None) -> str:
    """Connect this process to Ray; returns how, in words.

    * ``address`` a cluster (``auto``, ``host:port``, ``ray://...``): attach to it;
    * no ``address`` and no ``num_cpus``: attach to the local instance ``taalm ray start`` recorded, when it runs
      and was started from this environment (orchestrator/local_ray.py), else as ``"local"``;
    * ``"local"``, or ``num_cpus`` / ``num_gpus`` given: start a new local instance bound to 127.0.0.1 only (GCS,
      raylets, workers; no dashboard), even when another Ray runs on this machine; GPUs given on a machine without
      them are logical (trials are placed on them and run on the CPU, saying so)."""
    import ray

    if ray.is_initialized():
        return "Ray already initialised in this process"
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    # save Tune's experiment state every second, so a killed driver loses at most ~1 s of trial states
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    # MLflow is the study's record: no Tune CSV/JSON/TensorBoard loggers (they choke on the per-fact lists
    # of each report, and nothing here reads them)
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    if address and address != "local":
        target = os.environ.get("RAY_ADDRESS", "") if address == "auto" else address
        if target.rsplit(":", 1)[0] in LOOPBACK:  # a cluster started with --node-ip-address 127.0.0.1
            _keep_loopback()
        ray.init(address=address, log_to_driver=False)
        return f"Ray cluster {address}"
    head = _attachable_head(address, num_cpus, num_gpus)
    if head is not None and _token_auth_on():
        _keep_loopback()
        ray.init(address=head["address"], log_to_driver=False)
        return f"attached to the local Ray instance at {head['address']} ({head['num_cpus']} CPUs, taalm ray start)"
    _keep_loopback()
    # "local": a new instance even when a `ray start` cluster runs on this machine (ray.init() would join it)
    ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    return f"a new local Ray instance ({int(ray.cluster_resources().get('CPU', 0))} CPUs)"


def _attachable_head(address: Optional[str], num_cpus: Optional[int], num_gpus: Optional[float]) -> Optional[dict]:
    """The `taalm ray start` head a study attaches to: only without --address / --num-cpus / --num-gpus, and only
    where this process keeps token authentication on (the head has it on)."""
    if address is not None or num_cpus is not None or num_gpus is not None or not _auth_mode_token():
        return None
    from .local_ray import running_head

    return running_head()[0]


def _auth_mode_token() -> bool:
    return os.environ.get("RAY_AUTH_MODE", "token").lower() == "token"


def _token_auth_on() -> bool:
    """Token authentication on in this process, as for a new local instance (ray.init turns it on for those by
    itself, not for an explicit address): the environment variable, and Ray's configuration, read once at import,
    refreshed the way Ray's own ray.init does it (a private call: tests/test_install.py checks it still exists)."""
    from ray import _raylet

    if not _auth_mode_token() or not hasattr(_raylet, "Config"):
        return False  # the user turned authentication off: the head (token on) is not for this process
    os.environ["RAY_AUTH_MODE"] = "token"
    _raylet.Config.initialize("")
    return True


def local_cpus(address: Optional[str], num_cpus: Optional[int], num_gpus: Optional[float] = None) -> Optional[int]:
    """The CPUs of the Ray instance init_ray(address, num_cpus) will use when it is one on this machine (the
    recorded `taalm ray start` head, or a new local instance); None for a cluster. Read before anything starts."""
    import ray

    if num_cpus is not None and num_cpus < 1:
        raise InputError("--num-cpus", f"must be >= 1 (got {num_cpus}): a Ray instance without a CPU runs no trial")
    if ray.is_initialized():  # init_ray will keep this process's instance
        return int(ray.cluster_resources().get("CPU", 0)) or None
    if address and address != "local":
        return None
    head = _attachable_head(address, num_cpus, num_gpus)
    if head is not None:
        return int(head["num_cpus"])
    return num_cpus or os.cpu_count() or 1


def check_trial_cpus(res, cpus: Optional[int], where: str = "resources") -> None:
    """A trial that needs more CPUs than the local Ray instance has would wait forever: say so before anything
    starts."""
    if cpus is None:
        return
    need = res.cpus_per_worker * (1 if res.runs_lean() else res.workers)
    if need > cpus:
        raise InputError(f"{where}.cpus_per_worker",
                         f"a trial needs {need:g} CPUs ({res.workers} worker(s) x {res.cpus_per_worker:g}), but the "
                         f"local Ray instance has {cpus} (--num-cpus, or `taalm ray start --num-cpus`)")
    if res.meta_cpus is not None and res.meta_cpus > cpus:
        raise InputError(f"{where}.meta_cpus", f"{res.meta_cpus:g} CPUs asked for meta-training, but the local Ray "
                                               f"instance has {cpus}")


class Background:
    """``fn()`` running in a daemon thread; :meth:`result` waits for it and re-raises its error."""

    def __init__(self, fn: Callable, name: str):
        import threading

        self._box: dict = {}

        def run():
            try:
                self._box["value"] = fn()
            except BaseException as e:  # re-raised where the result is used
                self._box["error"] = e

        self._thread = threading.Thread(target=run, name=name, daemon=True)
        self._thread.start()

    def result(self):
        self._thread.join()
        if "error" in self._box:
            raise self._box["error"]
        return self._box["value"]

    def error(self) -> Optional[BaseException]:
        self._thread.join()
        return self._box.get("error")


class PendingStudy(Background):
    """The study's MLflow side (a :class:`Study`) being opened in a thread while Ray starts and Tune launches
    the first trials: using it waits for it (and re-raises its error). Pickled (Tune saves its callbacks as
    soon as it starts, and restores them on `taalm resume`), it is the Study once open, and until then the
    recipe that opens it again (the same experiment and study run, found by name)."""

    def __init__(self, uri: str, name: str, study_dir: Path, protocol: str, verbose: bool = False):
        self._recipe = (uri, name, study_dir, protocol)

        def open_study() -> Study:
            from .console import configure_output

            configure_output(study_dir, verbose, loggers=("mlflow", "alembic", "optuna"))
            study = Study(uri, name, study_dir, protocol)
            # the trials' learning-curve figures: matplotlib imported meanwhile, not when the first trial ends
            Background(_import_pyplot, "taalm-import-pyplot")
            return study

        super().__init__(open_study, "taalm-mlflow-start")

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


def start_study(study_dir: Path, uri: str, name: str, protocol: str, address: Optional[str],
                num_cpus: Optional[int], verbose: bool, progress=None,
                num_gpus: Optional[float] = None) -> PendingStudy:
    """Ray and the study's MLflow side start side by side: MLflow's import and the store (found, or created)
    in a thread while Ray's processes come up (or this process attaches to a running local instance) and Tune
    launches the first trials; both after the console is set up. ``progress``: told which Ray (``note``)."""
    from .console import configure_output

    configure_output(study_dir, verbose, loggers=("ray",))  # before Ray logs anything
    study = PendingStudy(uri, name, study_dir, protocol, verbose)
    how = init_ray(address, num_cpus, num_gpus)
    from .faults import install

    install(verbose)  # a killed trial fails alone; Ray's error lines go to the study log (orchestrator/faults.py)
    if hasattr(progress, "note"):
        progress.note(f"Ray: {how}")
    return study


def prepare_caches(configs: list, meta_cfg: Optional[dict] = None, threads: Optional[int] = None) -> list[str]:
    """Build in this process (a study's driver, on this machine), before the trials need them, the cache entries
    each trial would otherwise build at its start on its one core while the others wait: the dequantized SmolLM2
    and its tokenizer (on two cores: trainables.models.build_smollm2_caches), the tiny preset's tokenizer, and
    the tailored scores of a model with neither a cache entry nor a shipped score file (scored here with
    ``threads`` torch threads; the shipped ones seed the cache in the trial, which has the model at hand).
    ``configs``: the trials' run configs. Returns what was done, in words (nothing when every entry exists)."""
    import torch

    from trainables.models import build_smollm2_caches, smollm2_tokenizer_dir
    from trainables.tailor import scores_cache_path, shipped_scores_file

    done: list[str] = []
    models = [c.model for c in configs]
    if meta_cfg is not None:
        models.append(ModelConfig.model_validate(meta_cfg.get("model", {})))
        phi_model = (meta_cfg.get("phi") or {}).get("model")
        if phi_model:
            models.append(ModelConfig.model_validate(phi_model))
    names = {m.name for m in models}
    if "smollm2-135m" in names:
        done += [f"SmolLM2 {what}" for what in build_smollm2_caches()]
    elif "tiny" in names:
        from trainables.models import cache_dir

        if not (cache_dir() / "tokenizers" / "smollm2" / ".complete").exists():
            smollm2_tokenizer_dir()
            done.append("SmolLM2 tokenizer")
    seen, lamas = set(), {}
    for c in configs:
        if getattr(c, "temporalwiki", None) is not None or c.data.split != "tailored":
            continue
        from trainables.data import load_lama

        if c.data.dir not in lamas:  # the trials of a grid share their data: read and hashed once
            lamas[c.data.dir] = load_lama(c.data.dir)
        lama = lamas[c.data.dir]
        key = (scores_cache_path(c.model, lama, c.data.task), c.device)
        if key in seen:
            continue
        seen.add(key)
        if key[0].is_file() or shipped_scores_file(c.model, lama, c.data.task) is not None:
            continue
        from trainables.tailor import cached_scores
        from trainables.theta import build_theta, resolve_device

        before, n = torch.get_num_threads(), max(1, threads or os.cpu_count() or 1)
        torch.set_num_threads(n)
        try:
            device = resolve_device(c.device)
            theta = build_theta(c.model, None, device, c.seed)  # the base model: what tailoring scores
            cached_scores(c.model, lama, c.data.task, lambda: theta.model, theta.tokenizer, c.eval.batch_size, device)
            del theta
        finally:
            torch.set_num_threads(before)
        done.append(f"tailored scores of {c.model.name} ({c.data.task}, {n} threads)")
    return done


def start_preparing(configs: list, meta_cfg: Optional[dict], cpus: Optional[int]) -> Optional[Background]:
    """:func:`prepare_caches` in a thread, for a study on this machine (``cpus``: its Ray instance's CPUs; None:
    a cluster, whose nodes build their own). A failure there is only logged: the trials meet it as before."""
    if cpus is None:
        return None

    def run() -> list[str]:
        import logging

        try:
            return prepare_caches(configs, meta_cfg, cpus)
        except Exception as e:  # an optimisation only: the trial that needs the entry builds it, or fails, as before
            logging.getLogger("ray").warning("preparing the caches in the driver failed (%s: %s); the trials "
                                             "build what they need", type(e).__name__, e)
            return []

    return Background(run, "taalm-prepare-caches")


def note_prepared(prep: Optional[Background], progress) -> None:
    """Wait for :func:`start_preparing`'s work; say what it built."""
    done = prep.result() if prep is not None else []
    if done and hasattr(progress, "note"):
        progress.note("built once, before the trials: " + ", ".join(done))


def stated_memory_where(path: str | Path, overrides: list[str] | None) -> str:
    """Where ``resources.memory_gb`` is set (``file:line (resources.memory_gb)`` or ``--set ...``), for messages."""
    from trainables.configio import _where, apply_overrides, load_yaml

    data, lines = load_yaml(Path(path))
    touched = apply_overrides(data, overrides)
    return _where(str(path), ("resources", "memory_gb"), lines, touched)


def plan_memory(resources, need, progress, study: Study, stage: str):
    """The stage's resources with the concurrency memory allows and each trial's memory told to Ray's scheduler;
    the plan is said on the console, in the study log and as a tag of the study run."""
    import logging

    from .memory import plan_stage

    fit = plan_stage(resources, need)
    line = f"{stage}: memory: {fit.message}"
    logging.getLogger("ray.taalm").info("%s%s", line, f" [{need.describe()}]" if need else "")
    if hasattr(progress, "note"):
        progress.note(line)
    try:
        study.client.set_tag(study.parent_id, f"taalm.memory.{stage.split()[0]}", fit.message[:500])
    except Exception:  # noqa: BLE001 (a tag is not worth stopping the study for)
        pass
    return resources.model_copy(update={"max_concurrent": fit.fits,
                                        "memory_gb": round(fit.request_gb, 3) if fit.request_gb else None})


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


def _tune(specs: list[TrialSpec], info: dict, study: Study, name: str, study_dir: Path, spec: GridSpec,
          progress: Optional[Callable] = None, resume: bool = False):
    """A grid's stage (its trials, or the meta stage) through the one Tuner builder (orchestrator/tuning.py); the
    stage's resources are those of its trials (``specs[0].resources``: planned for memory)."""
    from ray import tune

    from .ray_trainables import trial_driver
    from .tuning import build_tuner, fit

    callbacks: list = [MlflowTrials(study, info)]
    if progress is not None:
        callbacks.append(progress)
    param_space = {"t": tune.grid_search([s.model_dump(mode="json") for s in specs])}
    tuner, guard = build_tuner(trial_driver, name=name, study_dir=study_dir, resources=specs[0].resources,
                               callbacks=callbacks, kind=specs[0].kind, param_space=param_space,
                               dirname=lambda t: f"{t.config['t']['trial_key']}", resume=resume)
    try:
        return fit(tuner, guard, study_dir)
    except BaseException:
        # the MLflow side opened while Tune started: its error (e.g. an unreachable tracking server) is the one to show
        err = study.error() if isinstance(study, PendingStudy) else None
        if err is not None:
            raise err from None
        raise


def _done_before(study: Study, keys: list[str], role: str = "trial") -> set[str]:
    """The trial keys a resumed study had finished already (their MLflow runs are FINISHED)."""
    runs = study.client.search_runs([study.experiment_id], f"tags.`taalm.role` = '{role}'", max_results=5000)
    want = set(keys)
    return {r.data.tags.get("taalm.trial_key") for r in runs
            if r.info.status == "FINISHED" and r.data.tags.get("taalm.trial_key") in want}


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


def phi_trained(d: Path) -> bool:
    """φ's cache directory holds a finished meta-training (OUT/phi is written at every better check, so it exists
    mid-training too; meta_metrics.json only at the end)."""
    return (d / "phi" / "phi.json").is_file() and (d / "meta_metrics.json").is_file()


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


def run_meta_stage(spec: GridSpec, trials: list[Trial], meta_cfg: dict, study: Study, study_dir: Path,
                   progress=None, resume: bool = False, retrain: bool = False,
                   faults: Optional[dict[str, int]] = None, cpus: Optional[int] = None) -> dict[int, str]:
    """Train φ (per seed or once), reusing a cached φ keyed by its config (which holds the data choice);
    a φ shipped in ablations/phi/ for exactly that config and data seeds the cache. ``retrain``: train
    anew, ignoring the cache and the shipped φ. An interrupted meta-training continues from its checkpoint
    (φ's cache directory, or the one Tune hands back to a retried trial). ``faults``: TAALM_INJECT_FAULT by label."""
    data_hash = meta_data_hash(meta_cfg)
    phis, todo, info = {}, [], {}
    for seed in meta_seeds(spec, trials, meta_cfg):
        cfg = dict(meta_cfg, seed=seed)
        key, d = phi_location(meta_cfg, seed, data_hash)
        phis[seed] = str(d / "phi")
        info[key] = {"run_name": meta_label(seed), "role": "meta", "params": meta_params(cfg),
                     "config": cfg, "tags": {"taalm.phi_dir": str(d / "phi"), "taalm.data_hash": data_hash}}
        if retrain:  # anew: neither the cached φ nor a half-trained one's checkpoint
            _clear_phi_cache(d)
        shipped = None if retrain or phi_trained(d) else shipped_phi(cfg, data_hash)
        if shipped is not None:
            _seed_phi_cache(shipped, d)
            study.client.set_tag(study.parent_id, f"taalm.phi_seed{seed}", f"shipped: {shipped}")
            for f in ("phi.json", "meta_metrics.json", "heatmap.html"):  # what φ is, beside the study
                if (shipped / f).is_file():
                    study.client.log_artifact(study.parent_id, str(shipped / f), f"phi_seed{seed}")
        if not phi_trained(d):  # not yet, or interrupted: the meta trial continues from d/checkpoint
            # what the grid uses at once, but no more than the local Ray instance has (a `taalm ray start`
            # instance, or --num-cpus, may have fewer: the stage would wait forever)
            meta_cpus = spec.resources.meta_cpu_count() if cpus is None else min(spec.resources.meta_cpu_count(), cpus)
            todo.append(TrialSpec(kind="meta", trial_key=key, label=meta_label(seed), config=cfg,
                                  phi_dir=str(d), storage_path=str((study_dir / "train").resolve()),
                                  inject_fault=(faults or {}).get(meta_label(seed)),
                                  resources=spec.resources.model_copy(update={
                                      "workers": 1, "cpus_per_worker": meta_cpus,
                                      "torch_threads": max(1, int(meta_cpus))})))
    if todo:
        from .memory import estimate_meta

        res = plan_memory(todo[0].resources.model_copy(update={"max_concurrent": 1, "memory_gb": None}),
                          estimate_meta(meta_cfg), progress, study, "meta-training φ")
        todo = [t.model_copy(update={"resources": res}) for t in todo]
        if hasattr(progress, "expect"):
            progress.expect("meta-training φ", [(t.trial_key, t.label, None) for t in todo], 1)
        results = _tune(todo, info, study, f"{spec.name}-meta", study_dir, spec, progress, resume)
        errors = [r.error for r in results if r.error]
        if errors:
            from .tracking import error_line

            raise RuntimeError(f"meta-training failed: {error_line(str(errors[0]))}")
    return phis


def run_ablation(grid_path: str | Path, overrides: list[str] | None = None, out_root: str | Path = "runs",
                 address: Optional[str] = None, tracking_uri: Optional[str] = None, progress=None,
                 num_cpus: Optional[int] = None, resume: bool = False, retrain_phi: bool = False,
                 verbose: bool = False, num_gpus: Optional[float] = None) -> dict:
    """Run (or resume) an ablation grid; ``progress``: a Tune callback, e.g. the CLI's
    :class:`~orchestrator.console.StudyConsole` (told each stage's trials through ``expect``)."""

    from .ray_trainables import injected_faults

    spec, trials, meta_cfg = load_grid(grid_path, overrides)  # everything validated before anything starts
    if not any(t.needs_phi and not t.config.weighting.train_attention.phi for t in trials):
        meta_cfg = None  # no trial needs a φ from the meta stage (e.g. a grid cut to rows without TAALM)
    meta_labels = [meta_label(s) for s in meta_seeds(spec, trials, meta_cfg)] if meta_cfg is not None else []
    faults = injected_faults([t.label for t in trials] + meta_labels)
    cpus = local_cpus(address, num_cpus, num_gpus)  # the local Ray instance's CPUs (None: a cluster)
    check_trial_cpus(spec.resources, cpus)
    from .memory import check_stated

    if spec.resources.memory_gb:
        check_stated(spec.resources, stated_memory_where(grid_path, overrides), local=address in (None, "local"))
    study_dir = Path(out_root) / spec.name
    study_dir.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri or default_tracking_uri(study_dir)
    StudyRecord(kind="grid", protocol=spec.protocol, name=spec.name, source=str(Path(grid_path).resolve()),
                overrides=overrides or [], tracking_uri=uri, out_root=str(Path(out_root).resolve()),
                baseline=spec.baseline,
                trials=[{"key": t.key, "label": t.label, "seed": t.seed} for t in trials]).write(study_dir)
    prep = start_preparing([t.config for t in trials], meta_cfg, cpus)
    study = start_study(study_dir, uri, spec.name, spec.protocol, address, num_cpus, verbose, progress, num_gpus)
    note_prepared(prep, progress)
    # the MLflow UI's view of the trials: summary metrics, then what the grid varies and the seed
    study.save_trials_view(list(dict.fromkeys(k for t in trials for k in t.overrides)) + ["seed"])
    if meta_cfg is not None:
        phis = run_meta_stage(spec, trials, meta_cfg, study, study_dir, progress, resume, retrain_phi, faults,
                              cpus)
        for t in trials:
            if t.needs_phi and not t.config.weighting.train_attention.phi:
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
                               storage_path=str((study_dir / "train").resolve()), inject_fault=faults.get(t.label)))
    from .memory import estimate_trial

    estimates = [estimate_trial(s.config, lean=s.resources.runs_lean(), keep_weights_gb=s.resources.keep_weights_gb,
                                meta_cfg=meta_cfg) for s in specs]
    need = None if any(e is None for e in estimates) else max(estimates, key=lambda e: e.total)
    res = plan_memory(spec.resources, need, progress, study, "trials")
    specs = [s.model_copy(update={"resources": res}) for s in specs]
    if hasattr(progress, "expect"):
        epochs = (lambda c: len(c["temporalwiki"]["periods"]) - 1) if spec.protocol == "temporalwiki" else \
            (lambda c: c["train"]["epochs"])
        progress.expect("trials", [(s.trial_key, f"{s.label} seed {s.config['seed']}", epochs(s.config))
                                   for s in specs], res.max_concurrent,
                        done_before=_done_before(study, [s.trial_key for s in specs]) if resume else None)
    results = _tune(specs, info, study, spec.name, study_dir, spec, progress, resume)
    failed = [r for r in results if r.error]
    study.finish("FAILED" if failed and len(failed) == len(specs) else "FINISHED")
    return {"study_dir": str(study_dir), "tracking_uri": uri, "experiment": spec.name, "trials": len(specs),
            "failed": len(failed), "baseline": spec.baseline}
