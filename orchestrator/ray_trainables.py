"""Ray entry points: a thin layer over the plain loops in trainables/.

A trial (:class:`~orchestrator.specs.TrialSpec`) runs one of three loops (the continual update,
meta-training, TemporalWiki), all of one shape (trainables/loop.py), through :class:`TrialSession`: the time
budget and fault injection at every step, every report with its checkpoint to Tune, the checkpoint restored
before a relaunched trial starts. Underneath, a *session* reports a result with an optional checkpoint, hands
back the checkpoint to resume from and says this worker's rank. Two sessions, one loop code:

* lean (single-worker trials, the default): the loop runs inside the Tune trial's own process
  (:class:`TuneSession`, ``ray.tune.report``). With ``reuse_actors`` that process stays warm from trial to
  trial (torch and transformers imported once, the base weights loaded once: ``trainables.models``);
* Ray Train (multi-worker trials, or ``resources.lean: false``): :func:`trial_driver` launches a
  TorchTrainer whose workers run the loop data-parallel (:class:`TrainSession`, ``ray.train.report``),
  forwarding reports to Tune through Ray's ``TuneReportCallback``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from trainables.loop import UNIT, Callback, Report, peak_rss_gb

from .faults import FAULT_ENV
from .specs import TrialSpec
from .storage import Storage, StorageCache, fetch_phi, publish_phi


class TuneSession:
    """A loop running in the Tune trial's process (single worker, rank 0)."""

    rank = 0

    def report(self, metrics: dict, checkpoint_dir: Optional[Path] = None) -> None:
        from ray import tune

        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir))
                    if checkpoint_dir else None)

    def checkpoint(self):
        from ray import tune

        return tune.get_checkpoint()


class TrainSession:
    """A loop running as one worker of a Ray Train run."""

    def __init__(self):
        import ray.train

        self.rank = ray.train.get_context().get_world_rank()

    def report(self, metrics: dict, checkpoint_dir: Optional[Path] = None) -> None:
        import ray.train
        from ray.train import Checkpoint

        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(checkpoint_dir))
                         if checkpoint_dir else None)

    def checkpoint(self):
        import ray.train

        return ray.train.get_checkpoint()


def _setup_threads(spec: TrialSpec) -> None:
    torch.set_num_threads(spec.resources.torch_threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _restore_into(session, out: Path, name: str) -> None:
    """The checkpoint Tune / Ray Train hands back to a relaunched trial, as ``out/name`` (replacing what is there:
    the recorded checkpoint is the one the study knows about)."""
    ckpt = session.checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            src = Path(d) / name
            if src.is_dir():
                shutil.rmtree(out / name, ignore_errors=True)
                shutil.copytree(src, out / name)


class TrialSession(Callback):
    """The orchestrator's side of every loop (continual, meta-training, TemporalWiki), one shape for all three:

    * every step: the time budget (``resources.time_budget_s``) and fault injection (``TAALM_INJECT_FAULT``);
    * every report: its numbers (``Report.flat``) and its checkpoint go to Tune / Ray Train, so that a relaunched
      trial restores it (:func:`_restore_into`, before the loop starts with ``resume``);
    * once per resumed attempt: the reports before the checkpoint (``restored``), in case the driver died before
      it logged them (the tracking callback fills in only what MLflow is missing)."""

    def __init__(self, spec: TrialSpec, session, placement: Optional[dict] = None):
        self.session, self.budget, self.fault = session, spec.resources.time_budget_s, spec.inject_fault
        self.started = time.monotonic()
        self.resumed_from: Optional[int] = None
        self.kind, self.reported = "epoch", None  # the loop's report kind, the last index reported in this attempt
        self.once: dict = {"placement": placement} if placement else {}  # where it runs: with the first report

    def on_start(self, info: dict) -> None:
        self.resumed_from = info.get("resumed_from")
        if info.get("to_learn_uuids") is not None:  # the facts behind every epoch's per-fact accuracies
            self.once["uuids"] = {"to_learn": info["to_learn_uuids"], "ntf": info["ntf_uuids"]}
        if self.resumed_from is not None and info.get("restored"):
            self.once["restored"] = info["restored"]

    def on_step(self, unit, step, n_steps, loss) -> None:
        if self.budget is not None and time.monotonic() - self.started > self.budget:
            raise TimeoutError(f"trial exceeded its time budget of {self.budget} s (resources.time_budget_s)")
        if (self.fault is not None and self.resumed_from is None and self.reported is not None
                and self.reported >= self.fault):  # a first attempt only
            raise RuntimeError(f"injected fault after {UNIT[self.kind]} {self.fault} ({FAULT_ENV})")

    def on_report(self, r: Report) -> None:
        import ray

        self.kind, self.reported = r.kind, r.index
        metrics = r.flat()
        metrics["node_id"] = ray.get_runtime_context().get_node_id()  # which Ray node ran rank 0
        metrics["pid"] = os.getpid()  # and which process (a warm process runs several trials)
        metrics["resumed_from"] = -1 if self.resumed_from is None else self.resumed_from
        if r.per_fact:  # every fact's accuracy this epoch (the report's paired comparisons); the facts once
            metrics["per_fact"] = dict(r.per_fact, **({"uuids": self.once.pop("uuids")} if "uuids" in self.once
                                                      else {}))
        if "restored" in self.once:
            metrics["restored"] = self.once.pop("restored")
        metrics.update(self.once.pop("placement", {}))
        metrics["peak_rss_gb"] = peak_rss_gb()  # this process's peak so far (orchestrator/memory.py's estimate)
        if r.checkpoint_dir and self.session.rank == 0:
            # the reported directory holds "checkpoint/", so a restore lands where the loop looks
            with _writes(f"the checkpoint of {UNIT[r.kind]} {r.index} to {{path}}", r.checkpoint_dir):
                with tempfile.TemporaryDirectory() as staging:
                    shutil.copytree(r.checkpoint_dir, Path(staging) / "checkpoint")
                    self.session.report(metrics, Path(staging))
        else:
            self.session.report(metrics)


def placed_device(spec: TrialSpec) -> tuple[str, dict]:
    """The device a trial runs on, as Ray placed it, and what to record about it: with ``gpus_per_worker`` > 0,
    the GPU Ray assigned (``CUDA_VISIBLE_DEVICES`` set by Ray: it is cuda:0 here, shared with the other trials
    packed on it when the request is fractional), or the CPU with the reason when this process has no CUDA; with
    no GPU asked for, ``device: auto`` means the CPU (Ray leaves the node's GPUs visible to every process)."""
    import logging

    import ray

    device = spec.config.get("device", "auto")
    res = spec.resources
    if res.gpus_per_worker <= 0:
        if device == "auto":
            return "cpu", {"device": "cpu"}
        return device, {"device": device}
    ids = [str(i) for i in ray.get_gpu_ids()]
    placed = {"gpu_ids": ",".join(ids), "gpu_share": res.gpus_per_worker}
    if device == "cpu":
        return device, {**placed, "device": "cpu", "device_note": "device: cpu in the config"}
    if torch.cuda.is_available():  # Ray's GPU as this process numbers it, capped at the trial's share of its memory
        from .gpu_plan import claim_gpu, local_cuda

        device, note = local_cuda(device, ids, os.environ.get("CUDA_VISIBLE_DEVICES"))
        return device, {**placed, "device": device, **claim_gpu(device, res.gpus_per_worker),
                        **({"device_note": note} if note else {})}
    why = "a CPU build" if torch.version.cuda is None else "no CUDA device or driver visible"
    note = (f"Ray assigned GPU {','.join(ids) or '?'} ({res.gpus_per_worker:g} of it) but this process has no CUDA "
            f"(torch {torch.__version__}: {why}): running on the CPU")
    logging.getLogger(__name__).warning(note)
    return "cpu", {**placed, "device": "cpu", "device_note": note}


class _writes:
    """A write of ``what`` that the disk refuses (full, read-only, a file-size limit) becomes a StorageError naming
    the path and the free space there, so the study stops instead of retrying (orchestrator/tuning.py)."""

    def __init__(self, what: str, where: str):
        self.what, self.where = what, where

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        import re

        from trainables.checkpoint import StorageError, disk_errno, storage_error

        if exc is None or isinstance(exc, StorageError) or not isinstance(exc, OSError):
            return False
        # pyarrow (Tune persisting the checkpoint) has no errno: "Cannot create directory 'P'. Detail: [errno 1] ..."
        code = disk_errno(exc)
        if code is None:
            return False
        quoted = re.search(r"'(/[^']+)'", str(exc))
        path = getattr(exc, "filename", None) or (quoted.group(1) if quoted else None) or _storage_dir() or self.where
        raise storage_error(OSError(code, os.strerror(code)), self.what, path) from exc


def _storage_dir() -> Optional[str]:
    """The trial's directory in the study's storage (where Tune persists its checkpoints), if known here."""
    try:
        from ray import tune

        return tune.get_context().get_trial_dir()
    except Exception:  # noqa: BLE001 (outside a Tune trial)
        return None


def _run_loop(spec: TrialSpec, session, out: Path) -> None:
    """The loop of ``spec.kind`` in ``out`` (its checkpoint restored there first), on the device Ray placed it
    on, reporting through ``session``."""
    _restore_into(session, out, "checkpoint")
    device, placement = placed_device(spec)
    config = dict(spec.config, device=device)
    callbacks = [TrialSession(spec, session, placement)]
    storage = Storage(spec.storage) if spec.storage else None
    if spec.kind == "continual":
        from trainables.config import RunConfig
        from trainables.continual import continual_update

        if spec.phi_key and storage is not None:  # the meta stage's φ, from the storage into this node's cache
            phi = fetch_phi(storage, spec.phi_key, _phi_cache(spec.phi_key))
            w = config["weighting"]
            config["weighting"] = {**w, "train_attention": {**w["train_attention"], "phi": str(phi)}}
        # the trials of this study that start from the same θ on the same facts evaluate epoch 0 once
        cache = StorageCache(storage, "initial_eval") if storage is not None else \
            Path(spec.storage_path) / "initial_eval" if spec.storage_path else None
        continual_update(RunConfig.model_validate(config), out_dir=out, callbacks=callbacks, initial_eval_cache=cache)
    elif spec.kind == "meta":
        from trainables.meta import MetaConfig, meta_train

        meta_train(MetaConfig.model_validate(config), out_dir=out, callbacks=callbacks)
        if storage is not None and spec.phi_key:  # for the trials on every node, and the driver's record
            publish_phi(storage, spec.phi_key, out)
    else:
        from trainables.temporalwiki import TemporalWikiConfig, temporalwiki_run

        temporalwiki_run(TemporalWikiConfig.model_validate(config), out_dir=out, callbacks=callbacks)


def loop_worker(spec: TrialSpec, session) -> None:
    """One trial's loop: meta-training works in φ's directory (``spec.phi_dir``, where φ is kept); the others in a
    scratch directory removed afterwards (their checkpoints live on in Tune / Ray Train)."""
    if spec.kind == "meta":  # φ's cache directory on this node (the driver's path when it has none of its own)
        _run_loop(spec, session, _phi_cache(spec.phi_key) if spec.phi_key else Path(spec.phi_dir))
        return
    out = Path(tempfile.mkdtemp(prefix=f"taalm-trial-r{session.rank}-"))
    try:
        _run_loop(spec, session, out)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _phi_cache(key: str) -> Path:
    """φ's cache directory on this node (TAALM_CACHE/phi/<key>)."""
    from trainables.models import cache_dir

    return cache_dir() / "phi" / key


def train_worker(config: dict) -> None:
    """The per-worker function of a Ray Train run."""
    spec = TrialSpec.model_validate(config)
    _setup_threads(spec)
    loop_worker(spec, TrainSession())


def run_trial(spec: TrialSpec) -> None:
    """Run one trial from inside a Tune trainable: in this process (lean) or as a Ray Train run."""
    if spec.resources.runs_lean() or spec.kind == "meta":
        from trainables.models import keep_base_weights

        _setup_threads(spec)
        keep_base_weights(int(spec.resources.keep_weights_gb * 2 ** 30))
        try:
            loop_worker(spec, TuneSession())
        finally:  # this process may run the next trial (reuse_actors): it starts from what is really in use
            from .gpu_plan import release_gpu
            from .memory import release_freed_memory

            release_freed_memory()
            release_gpu()
        return
    import ray.train
    from ray.train import FailureConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    res = spec.resources
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=spec.model_dump(mode="json"),
        scaling_config=ScalingConfig(num_workers=res.workers, use_gpu=res.gpus_per_worker > 0,
                                     resources_per_worker={"CPU": res.cpus_per_worker,
                                                           **({"GPU": res.gpus_per_worker}
                                                              if res.gpus_per_worker else {}),
                                                           **_memory(res)}),
        run_config=ray.train.RunConfig(
            # stable per trial: a re-launched trial restores from its own latest checkpoint
            name=f"train-{spec.trial_key}", storage_path=spec.storage_path,
            callbacks=[TuneReportCallback()], failure_config=FailureConfig(max_failures=0)),
    )
    trainer.fit()


def trial_driver(config: dict) -> None:
    """The Tune function trainable of grids and the meta stage: ``config["t"]`` is a TrialSpec."""
    run_trial(TrialSpec.from_tune(config))


def trial_resources(res, kind: str = "continual"):
    """What a trial's Tune process holds: the work itself (lean, and the single-worker meta stage), or
    nothing but a token while its Ray Train workers hold the resources (placing the driver on a CPU would
    deadlock 2 trials on 2 cores)."""
    from ray import tune

    if res.runs_lean() or kind == "meta":  # a fractional GPU packs several trials on one GPU
        return tune.PlacementGroupFactory([{"CPU": res.cpus_per_worker,
                                            **({"GPU": res.gpus_per_worker} if res.gpus_per_worker else {}),
                                            **_memory(res)}])
    return tune.PlacementGroupFactory([{"CPU": 0, "memory": 1024 ** 2}])


def _memory(res) -> dict:
    """Ray's ``memory`` resource a trial worker reserves (``resources.memory_gb``, stated or estimated: the study
    plans it, orchestrator/memory.py), so that Ray's scheduler, not the OOM killer, keeps trials apart."""
    return {"memory": int(res.memory_gb * 2 ** 30)} if res.memory_gb else {}
