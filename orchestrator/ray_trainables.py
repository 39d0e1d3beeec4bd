"""Ray entry points: a thin layer over the plain loops in trainables/.

* :func:`continual_worker` / :func:`meta_worker`: the per-worker loops that Ray Train runs (data parallel
  over gloo on CPU or NCCL on GPU for the continual loop); they report every epoch / validation with
  ``ray.train.report`` and attach rank 0's checkpoint, and resume from ``ray.train.get_checkpoint()``.
* :func:`trial_driver`: the Tune function trainable that launches one TorchTrainer per trial and
  forwards its reports to Tune through Ray's ``TuneReportCallback``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

REPORT_KEYS = ("to_learn_acc", "ntf_acc", "to_learn_em", "ntf_em", "train_loss", "mean_weight", "wall_seconds")


def _setup_threads(config: dict) -> None:
    torch.set_num_threads(int(config.get("torch_threads", 1)))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _restore_into(out: Path, name: str) -> None:
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            src = Path(d) / name
            if src.is_dir():
                shutil.copytree(src, out / name, dirs_exist_ok=True)


FAULT_ENV = "TAALM_INJECT_FAULT"


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


def continual_worker(config: dict) -> None:
    import ray
    import ray.train
    from ray.train import Checkpoint

    from trainables.config import RunConfig
    from trainables.continual import Callback, continual_update

    _setup_threads(config)
    cfg = RunConfig.model_validate(config["run"])
    rank = ray.train.get_context().get_world_rank()
    out = Path(tempfile.mkdtemp(prefix=f"taalm-trial-r{rank}-"))
    _restore_into(out, "checkpoint")

    budget = config["resources"].get("time_budget_s")
    fault = config.get("inject_fault")
    started = time.monotonic()

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
            metrics["start_epoch"] = self.start_epoch
            # every fact's accuracy this epoch (the report's paired comparisons); the facts once per attempt
            metrics["per_fact"] = dict(r.per_fact, **({"uuids": self.uuids} if self.uuids else {}))
            self.uuids = None
            if self.restored_history is not None:
                # once per resumed attempt: the epochs before the checkpoint, in case the driver was killed
                # before it logged them (the tracking callback fills in only what it is missing)
                metrics["restored_history"], self.restored_history = self.restored_history, None
            if r.checkpoint_dir:
                # the checkpoint directory holds "checkpoint/" so a restore lands where the loop looks
                with tempfile.TemporaryDirectory() as staging:
                    shutil.copytree(r.checkpoint_dir, Path(staging) / "checkpoint")
                    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(staging))
            else:
                ray.train.report(metrics)

    try:
        continual_update(cfg, out_dir=out, callbacks=[Report()])
    finally:
        shutil.rmtree(out, ignore_errors=True)


def temporalwiki_worker(config: dict) -> None:
    """The TemporalWiki protocol as a Ray Train run: one report per period (epoch = period index)."""
    import ray.train

    from trainables.temporalwiki import TemporalWikiConfig, temporalwiki_run

    _setup_threads(config)
    cfg = TemporalWikiConfig.model_validate(config["run"])
    seen: list[dict] = []

    def on_period(r):
        seen.append(r)
        ray.train.report({"epoch": r["index"], "period": r["period"], "changed_ppl": r["changed_ppl"],
                          "unchanged_ppl": r["unchanged_ppl"], "train_loss": r["train_loss"],
                          "avg_changed_ppl": sum(x["changed_ppl"] for x in seen) / len(seen),
                          "avg_unchanged_ppl": sum(x["unchanged_ppl"] for x in seen) / len(seen)})

    temporalwiki_run(cfg, on_period=on_period)


def meta_worker(config: dict) -> None:
    """Meta-training as a single-worker Ray Train run; φ is written to ``config['phi_dir']``."""
    import ray.train

    from trainables.meta import MetaConfig, meta_train

    _setup_threads(config)
    cfg = MetaConfig.model_validate(config["meta"])
    out = Path(config["phi_dir"])

    def on_step(ev):
        if "validation" in ev:
            v = ev["validation"]
            ray.train.report({"step": v["step"], "val_acc": v["val_acc"],
                              "object_weight_ratio": v["object_weight_ratio"],
                              "object_weight_share": v["object_weight_share"], "uniform_share": v["uniform_share"]})

    meta_train(cfg, out_dir=out, on_step=on_step)


def trial_driver(config: dict) -> None:
    """Tune trainable: one TorchTrainer per trial, reporting through TuneReportCallback."""
    import ray.train
    from ray.train import FailureConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    config = config["t"]  # the trial, as expanded by the orchestrator
    res = config["resources"]
    kind = config["kind"]
    workers = res["workers"] if kind in ("continual", "temporalwiki") else 1
    worker = {"continual": continual_worker, "meta": meta_worker, "temporalwiki": temporalwiki_worker}[kind]
    trainer = TorchTrainer(
        worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=res["gpus_per_worker"] > 0,
                                     resources_per_worker={"CPU": res["cpus_per_worker"],
                                                           **({"GPU": res["gpus_per_worker"]}
                                                              if res["gpus_per_worker"] else {})}),
        run_config=ray.train.RunConfig(
            # stable per trial: a re-launched trial restores from its own latest checkpoint
            name=f"train-{config['trial_key']}", storage_path=config["storage_path"],
            callbacks=[TuneReportCallback()], failure_config=FailureConfig(max_failures=0)),
    )
    trainer.fit()
