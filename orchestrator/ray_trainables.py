"""Ray entry points: a thin layer over the plain loops in trainables/.

A trial (:class:`~orchestrator.specs.TrialSpec`) runs one of three loops (the continual update,
meta-training, TemporalWiki) through a *session*: report a result with an optional checkpoint, hand back
the checkpoint to resume from, say this worker's rank. Two sessions, one loop code:

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

from .specs import TrialSpec

REPORT_KEYS = ("to_learn_acc", "ntf_acc", "to_learn_em", "ntf_em", "train_loss", "mean_weight", "wall_seconds")
FAULT_ENV = "TAALM_INJECT_FAULT"


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
    ckpt = session.checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            src = Path(d) / name
            if src.is_dir():
                shutil.copytree(src, out / name, dirs_exist_ok=True)


def injected_faults(labels: list[str]) -> dict[str, int]:
    """Fault injection for checking retries before a long study (a testing hook, off by default).

    ``TAALM_INJECT_FAULT=EPOCH`` (every trial) or ``EPOCH:LABEL[,EPOCH:LABEL...]`` makes a trial's first
    attempt crash at the first step after epoch EPOCH was checkpointed; a retry (``resources.max_failures``)
    restores that checkpoint and goes on without the fault. Read once in the driver, at study start."""
    from trainables.errors import InputError

    raw = os.environ.get(FAULT_ENV, "").strip()
    out: dict[str, int] = {}
    for item in filter(None, (x.strip() for x in raw.split(","))):
        epoch, _, label = item.partition(":")
        if not epoch.isdigit() or (label and label not in labels):
            raise InputError(f"{FAULT_ENV}={raw}", f"expected EPOCH or EPOCH:LABEL with a label of this study "
                                                    f"({', '.join(sorted(set(labels)))})")
        for name in ([label] if label else labels):
            out[name] = int(epoch)
    return out


def continual_worker(spec: TrialSpec, session) -> None:
    import ray

    from trainables.config import RunConfig
    from trainables.continual import Callback, continual_update

    cfg = RunConfig.model_validate(spec.config)
    out = Path(tempfile.mkdtemp(prefix=f"taalm-trial-r{session.rank}-"))
    _restore_into(session, out, "checkpoint")
    budget, fault, started = spec.resources.time_budget_s, spec.inject_fault, time.monotonic()

    class Report(Callback):
        start_epoch = 0
        restored_history = None

        def on_run_start(self, info):
            self.start_epoch = info["start_epoch"]  # > 0 when this attempt resumed from a checkpoint
            self.restored_history = info["restored_history"]
            self.uuids = {"to_learn": info["to_learn_uuids"], "ntf": info["ntf_uuids"]}

        def on_step(self, epoch, step, n_steps, loss):
            if budget is not None and time.monotonic() - started > budget:
                raise TimeoutError(f"trial exceeded its time budget of {budget} s (resources.time_budget_s)")
            if fault is not None and self.start_epoch == 0 and epoch == fault + 1:  # a first attempt only
                raise RuntimeError(f"injected fault after epoch {fault} ({FAULT_ENV})")

        def on_epoch_end(self, r):
            metrics = {"epoch": r.epoch, **{k: getattr(r, k) for k in REPORT_KEYS}, **r.summary}
            metrics = {k: (float("nan") if v is None else v) for k, v in metrics.items()}
            metrics["node_id"] = ray.get_runtime_context().get_node_id()  # which Ray node ran rank 0
            metrics["pid"] = os.getpid()  # and which process (a warm process runs several trials)
            metrics["start_epoch"] = self.start_epoch
            # every fact's accuracy this epoch (the report's paired comparisons); the facts once per attempt
            metrics["per_fact"] = dict(r.per_fact, **({"uuids": self.uuids} if self.uuids else {}))
            self.uuids = None
            if self.restored_history is not None:
                # once per resumed attempt: the epochs before the checkpoint, in case the driver was killed
                # before it logged them (the tracking callback fills in only what it is missing)
                metrics["restored_history"], self.restored_history = self.restored_history, None
            if r.checkpoint_dir:
                # the reported directory holds "checkpoint/", so a restore lands where the loop looks
                with tempfile.TemporaryDirectory() as staging:
                    shutil.copytree(r.checkpoint_dir, Path(staging) / "checkpoint")
                    session.report(metrics, Path(staging))
            else:
                session.report(metrics)

    try:
        # the trials of this study that start from the same θ on the same facts evaluate epoch 0 once
        continual_update(cfg, out_dir=out, callbacks=[Report()],
                         initial_eval_cache=Path(spec.storage_path) / "initial_eval" if spec.storage_path else None)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def temporalwiki_worker(spec: TrialSpec, session) -> None:
    """The TemporalWiki protocol: one report per period (epoch = period index)."""
    from trainables.temporalwiki import TemporalWikiConfig, temporalwiki_run

    cfg = TemporalWikiConfig.model_validate(spec.config)
    seen: list[dict] = []

    def on_period(r):
        seen.append(r)
        session.report({"epoch": r["index"], "period": r["period"], "changed_ppl": r["changed_ppl"],
                        "unchanged_ppl": r["unchanged_ppl"], "train_loss": r["train_loss"],
                        "avg_changed_ppl": sum(x["changed_ppl"] for x in seen) / len(seen),
                        "avg_unchanged_ppl": sum(x["unchanged_ppl"] for x in seen) / len(seen)})

    temporalwiki_run(cfg, on_period=on_period)


def meta_worker(spec: TrialSpec, session) -> None:
    """Meta-training; φ is written to ``spec.phi_dir``; one report per validation check."""
    from trainables.meta import MetaConfig, meta_train

    cfg = MetaConfig.model_validate(spec.config)

    def on_step(ev):
        if "validation" in ev:
            v = ev["validation"]
            session.report({"step": v["step"], "val_acc": v["val_acc"],
                            "object_weight_ratio": v["object_weight_ratio"],
                            "object_weight_share": v["object_weight_share"], "uniform_share": v["uniform_share"]})

    meta_train(cfg, out_dir=Path(spec.phi_dir), on_step=on_step)


WORKERS = {"continual": continual_worker, "meta": meta_worker, "temporalwiki": temporalwiki_worker}


def train_worker(config: dict) -> None:
    """The per-worker function of a Ray Train run."""
    spec = TrialSpec.model_validate(config)
    _setup_threads(spec)
    WORKERS[spec.kind](spec, TrainSession())


def run_trial(spec: TrialSpec) -> None:
    """Run one trial from inside a Tune trainable: in this process (lean) or as a Ray Train run."""
    if spec.resources.runs_lean() or spec.kind == "meta":
        from trainables.models import keep_base_weights

        _setup_threads(spec)
        keep_base_weights(int(spec.resources.keep_weights_gb * 2 ** 30))
        WORKERS[spec.kind](spec, TuneSession())
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
                                                              if res.gpus_per_worker else {})}),
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

    if res.runs_lean() or kind == "meta":
        return tune.PlacementGroupFactory([{"CPU": res.cpus_per_worker,
                                            **({"GPU": res.gpus_per_worker} if res.gpus_per_worker else {})}])
    return tune.PlacementGroupFactory([{"CPU": 0, "memory": 1024 ** 2}])
