"""The continual-update loop: θ learns TO-LEARN documents with token weights, evaluated every epoch.

    metrics = continual_update(cfg, out_dir="runs/x")

Epoch 0 is the evaluation before training; after every epoch, TO-LEARN and NOT-TO-FORGET probe
accuracy (token accuracy and exact match) are measured, the loop state is checkpointed (safetensors + JSON)
and a :class:`~trainables.loop.Report` of kind "epoch" goes to the callbacks (Ray Tune and MLflow hang off
them), so the run resumes where it stopped, with the metrics of an uninterrupted run (the shape every loop
shares: trainables/loop.py). Deterministic for a seed on CPU.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import seeds
from .checkpoint import load_loop_checkpoint, save_loop_checkpoint, write_json_atomic
from .config import RunConfig, config_to_dict
from .data import LamaCKL, Split, load_lama
from .encode import EncodedDoc, encode_documents, encode_probes
from .errors import InputError
from .loop import Callback, EpochLog, Report, check_resumable, device_memory
from .loss import token_nll
from .metrics import EncodedProbe, mean, probe_scores, summarize
from .models import load_tokenizer
from .regularizers import Regularizer, build_regularizer
from .replay import Replay, build_replay
from .tailor import build_split
from .step import EpochStats, MicroBatching, autocast, epoch_batches, train_step_stats
from .theta import Theta, build_theta, resolve_device
from .weighting import Composite, SchemeEnv, build_weighting


@dataclass
class RunSetup:
    """Everything a run needs, built once (:func:`prepare_run`): θ, the data, and one component per axis."""

    cfg: RunConfig
    theta: Theta
    docs: list[EncodedDoc]  # what θ trains on
    weighting: Composite
    regularizer: Regularizer
    replay: Replay
    split: Optional[Split] = None  # LAMA-CKL only
    lama: Optional[LamaCKL] = None
    to_learn_probes: list[EncodedProbe] = field(default_factory=list)
    ntf_probes: list[EncodedProbe] = field(default_factory=list)
    data_hash: str = ""

    # θ's parts, by their usual names
    model = property(lambda self: self.theta.model)
    trainable = property(lambda self: self.theta.trainable)
    tokenizer = property(lambda self: self.theta.tokenizer)
    device = property(lambda self: self.theta.device)
    reference_model = property(lambda self: self.theta.reference_model)  # the frozen initial θ's forward, when needed
    pad_id = property(lambda self: self.theta.pad_id)

    def components(self) -> tuple:
        return (self.theta.parameterisation, self.weighting, self.regularizer, self.replay)


def build_components(cfg: RunConfig, env: SchemeEnv) -> tuple[Composite, Regularizer, Replay]:
    """The weighting, regulariser and replay of a run, from their config blocks (data comes in ``setup``)."""
    return build_weighting(cfg.weighting, env), build_regularizer(cfg.regularizer, cfg.train), \
        build_replay(cfg.replay, cfg.seed)


def finish_setup(setup: RunSetup, env: SchemeEnv) -> RunSetup:
    """Run the frozen initial θ under θ's precision (what it is compared with: at step 0 RHO-1's excess loss and GeRe's
    and SEEKR's constraints are 0, not rounding noise), wire it into the weighting environment, then every
    component's ``setup`` hook."""
    env.precision = setup.cfg.train.precision
    setup.theta.reference_model = under_autocast(setup.theta.reference_model, setup.device, env.precision)
    if setup.weighting.needs_reference_model:
        env.reference_model_nll = lambda ids, mask: token_nll(setup.reference_model(ids, mask).logits, ids, mask)
    for c in setup.components():
        c.setup(setup)
    return setup


def under_autocast(forward, device, precision: str):
    """``forward`` run under ``precision``'s autocast (None and fp32: as it is)."""
    if forward is None or precision == "fp32" or getattr(forward, "precision", None) == precision:
        return forward

    def run(*args, **kwargs):
        with autocast(device, precision):
            return forward(*args, **kwargs)

    run.precision = precision
    return run


def prepare_run(cfg: RunConfig, progress=None) -> RunSetup:
    device = resolve_device(cfg.device)
    seeds.seed_everything(cfg.seed)
    lama = load_lama(cfg.data.dir)
    tokenizer = load_tokenizer(cfg.model)
    env = SchemeEnv(tokenizer=tokenizer, device=device, dtype=cfg.model.dtype)
    weighting, regularizer, replay = build_components(cfg, env)
    theta = build_theta(cfg.model, cfg.params, device, cfg.seed, tokenizer=tokenizer,
                        needs_reference_model=any(c.needs_reference_model for c in (weighting, regularizer, replay)))
    # tailoring scores facts with the untrained θ (LoRA, K-Adapter and full fine-tuning all start at the base model)
    split = build_split(cfg.data, cfg.model, lama, tokenizer, lambda: theta.model, cfg.eval.batch_size, device,
                        progress=progress)
    if not split.to_learn:
        raise InputError("data.split", f"the TO-LEARN set is empty for this model ({split.origin}); "
                                       "check data.split / data.max_doc_tokens")
    if not split.ntf:  # e.g. a random model tailored on itself knows no fact: nothing to measure forgetting on
        raise InputError("data.split", f"the NOT-TO-FORGET set is empty for this model ({split.origin}): it knows "
                                       "none of the invariant facts; use data.split: release (the release's scores) "
                                       "or data.split: file, or a model that knows some facts")
    theta.model.train()
    setup = RunSetup(cfg=cfg, theta=theta, docs=encode_documents(tokenizer, split.to_learn, cfg.train.max_length),
                     weighting=weighting, regularizer=regularizer, replay=replay, split=split, lama=lama,
                     to_learn_probes=encode_probes(tokenizer, split.to_learn, cfg.data.task),
                     ntf_probes=encode_probes(tokenizer, split.ntf, cfg.data.task), data_hash=lama.hash)
    return finish_setup(setup, env)


@dataclass
class DataParallel:
    """Data parallelism over torch.distributed (gloo on CPU, NCCL on GPU), set up by Ray Train.

    Every worker holds the same θ (same seed); each takes a contiguous shard of every global batch and
    of the probes; gradients and metric sums are all-reduced, so a run on N workers matches a run on
    one worker with the same global batch (up to float summation order)."""

    rank: int
    world: int

    @classmethod
    def from_torch(cls) -> Optional["DataParallel"]:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return cls(dist.get_rank(), dist.get_world_size())
        return None

    def shard(self, items: list) -> list:
        n = len(items)
        lo, hi = n * self.rank // self.world, n * (self.rank + 1) // self.world
        return items[lo:hi]

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t


def evaluate(setup: RunSetup, dp: Optional[DataParallel] = None) -> dict:
    """TO-LEARN and NOT-TO-FORGET accuracy and exact match, and every fact's accuracy (``*_per_fact``, in
    the split's order: what paired comparisons between methods resample)."""
    bs = setup.cfg.eval.batch_size
    out = {}
    for name, probes in (("to_learn", setup.to_learn_probes), ("ntf", setup.ntf_probes)):
        n = len(probes)
        lo = n * dp.rank // dp.world if dp else 0
        mine = dp.shard(probes) if dp else probes
        # in fp32 whatever train.precision (trainables/metrics.py says why)
        scores = probe_scores(setup.model, mine, setup.pad_id, bs, setup.device) if mine else []
        per_fact = torch.zeros(2, n, dtype=torch.float64)  # accuracy, exact match; each rank fills its shard
        if scores:
            per_fact[:, lo:lo + len(scores)] = torch.tensor(scores, dtype=torch.float64).T
        if dp:
            dp.all_reduce_(per_fact)
        out[f"{name}_acc"] = per_fact[0].mean().item() if n else float("nan")
        out[f"{name}_em"] = per_fact[1].mean().item() if n else float("nan")
        out[f"{name}_per_fact"] = per_fact[0].tolist()
    return out


def initial_evaluation(setup: RunSetup, dp: Optional[DataParallel] = None, cache: Optional[Path] = None) -> dict:
    """Epoch 0: θ before any update. ``cache`` (a directory of one study): the trials of a study that start from
    the same θ (same model, parameterisation, seed, regulariser and replay, whose set-up runs before this, and
    training options; only the token weighting, which never touches θ, may differ) on the same facts evaluate
    it once; the others read that evaluation. Not under data parallelism."""
    if cache is None or dp is not None:
        return evaluate(setup, dp)
    import hashlib

    import transformers

    from .models import model_key

    cfg = config_to_dict(setup.cfg)
    for k in ("weighting", "checkpoint"):
        cfg.pop(k, None)
    cfg.get("train", {}).pop("epochs", None)
    ident = {"config": cfg, "model_key": model_key(setup.cfg.model), "data_hash": setup.data_hash,
             "to_learn": [f.uuid for f in setup.split.to_learn], "ntf": [f.uuid for f in setup.split.ntf],
             "device": str(setup.device), "threads": torch.get_num_threads(), "torch": torch.__version__,
             "transformers": transformers.__version__}
    name = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24] + ".json"
    if isinstance(cache, (str, Path)):
        cache = DirCache(Path(cache))
    with cache.lock(name):  # trials started together (on one machine): one evaluates, the other waits and reads
        saved = cache.read(name)
        if isinstance(saved, dict) and saved.get("ident") == ident and "evaluation" in saved:
            return saved["evaluation"]
        ev = evaluate(setup, dp)
        cache.write(name, {"ident": ident, "evaluation": ev})
    return ev


class DirCache:
    """The epoch-0 evaluations of a study in a directory (a JSON file each, written whole; a lock per file across
    the processes of this machine). The orchestrator gives trials on a cluster one with the same three methods
    over the study's storage (orchestrator/storage.py: StorageCache)."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)

    def lock(self, name: str):
        from .checkpoint import exclusive

        return exclusive(self.dir / name)

    def read(self, name: str):
        try:
            return json.loads((self.dir / name).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def write(self, name: str, data: dict) -> None:
        write_json_atomic(self.dir / name, data)


# a resumed run may train longer, checkpoint differently, split its batches differently (the same update)
RESUME_IGNORED = ("train.epochs", "checkpoint.every", "train.micro_batch_size", "train.oom")
CURVE_KEYS = ("to_learn_acc", "ntf_acc", "to_learn_em", "ntf_em", "train_loss", "mean_weight")


def _restored_epoch(history: dict, epoch: int) -> dict:
    """Epoch ``epoch`` of a checkpoint's history as its report's numbers (with every fact's accuracy)."""
    out = {"index": epoch, **{k: history[k][epoch] for k in CURVE_KEYS if epoch < len(history[k])}}
    if epoch < len(history["to_learn_per_fact"]):
        out["per_fact"] = {"to_learn": history["to_learn_per_fact"][epoch], "ntf": history["ntf_per_fact"][epoch]}
    return out


def continual_update(cfg: RunConfig, out_dir: Optional[str | Path] = None, callbacks: Sequence[Callback] = (),
                     resume: bool = True, setup: Optional[RunSetup] = None,
                     dp: Optional[DataParallel] = None, initial_eval_cache: Optional[Path] = None) -> dict:
    """Run (or resume) one continual-update run; return the metrics dict (also DIR/metrics.json).

    Under torch.distributed (e.g. Ray Train workers) the run is data-parallel across the process group
    (``dp``, detected when not given); every rank resumes from its DIR/checkpoint, rank 0 writes.
    ``initial_eval_cache``: a study's directory where trials share the epoch-0 evaluation of the same θ
    (:func:`initial_evaluation`)."""
    t_start = time.perf_counter()
    dp = dp or DataParallel.from_torch()
    writer = dp is None or dp.rank == 0
    out = Path(out_dir) if out_dir else None
    ckpt_dir = out / "checkpoint" if out else None
    setup = setup or prepare_run(cfg)
    optimizer = setup.regularizer.optimizer(list(setup.trainable.values()))
    micro = MicroBatching(cfg.train.oom, cfg.train.batch_size, cfg.train.micro_batch_size)
    grouping = cfg.train.group_by_length and cfg.replay.kind == "none"
    cfg_dict = config_to_dict(cfg)

    history = {k: [] for k in ("to_learn_acc", "ntf_acc", "to_learn_em", "ntf_em", "train_loss", "mean_weight",
                               "to_learn_per_fact", "ntf_per_fact")}
    start_epoch, wall_before, train_tokens, train_seconds = 0, 0.0, 0, 0.0
    if resume and ckpt_dir is not None and ckpt_dir.exists():
        state = load_loop_checkpoint(ckpt_dir, setup.trainable, optimizer)
        check_resumable(state.get("config", {}), cfg_dict, RESUME_IGNORED, str(ckpt_dir))
        history = {**{k: [] for k in history}, **state["history"]}
        start_epoch = state["epoch"] + 1
        wall_before = state["wall_seconds"]
        train_tokens, train_seconds = state["train_tokens"], state["train_seconds"]
        micro.size, micro.events = state.get("micro_batch_size", micro.size), state.get("oom_events", [])

    info = {"n_to_learn": len(setup.split.to_learn), "n_ntf": len(setup.split.ntf),
            **{k: v for c in setup.components() if c is not None for k, v in c.describe().items()},
            "n_trainable_params": sum(p.numel() for p in setup.trainable.values()),
            "split": setup.split.summary(), "data_hash": setup.data_hash, "start_epoch": start_epoch,
            "resumed_from": start_epoch - 1 if start_epoch else None,
            **({"group_by_length": "on" if grouping else "off: replayed documents of any length join every batch"}
               if cfg.train.group_by_length else {}),
            # the facts behind *_per_fact, in order
            "to_learn_uuids": [f.uuid for f in setup.split.to_learn], "ntf_uuids": [f.uuid for f in setup.split.ntf],
            # the curves up to the checkpoint this run resumed from (None for a fresh run) ...
            "restored_history": {k: list(v) for k, v in history.items()} if start_epoch else None,
            # ... as one entry per epoch (the reports an interrupted attempt made)
            "restored": [_restored_epoch(history, e) for e in range(start_epoch)]}
    for cb in callbacks:
        cb.on_start(info)

    epoch_log = EpochLog(out / "epochs.jsonl", start_epoch) if writer and out is not None else None

    def finish_epoch(epoch: int, loss: Optional[float], weight: Optional[float], trained: Optional[dict] = None) -> None:
        t_eval = time.perf_counter()
        ev = initial_evaluation(setup, dp, initial_eval_cache) if epoch == 0 else evaluate(setup, dp)
        eval_seconds = time.perf_counter() - t_eval
        for k, v in ev.items():
            history[k].append(v)
        history["train_loss"].append(loss)
        history["mean_weight"].append(weight)
        wall = wall_before + time.perf_counter() - t_start
        written = None
        if writer and ckpt_dir is not None and cfg.checkpoint.every and (epoch % cfg.checkpoint.every == 0
                                                              or epoch == cfg.train.epochs):
            save_loop_checkpoint(ckpt_dir, setup.trainable, optimizer, {
                "epoch": epoch, "history": history, "wall_seconds": wall, "config": cfg_dict,
                "train_tokens": train_tokens, "train_seconds": train_seconds, "micro_batch_size": micro.size,
                "oom_events": micro.events})
            written = str(ckpt_dir)
        report = Report("epoch", epoch, cfg.train.epochs, {
            "to_learn_acc": ev["to_learn_acc"], "ntf_acc": ev["ntf_acc"], "to_learn_em": ev["to_learn_em"],
            "ntf_em": ev["ntf_em"], "train_loss": loss, "mean_weight": weight, "micro_batch_size": micro.size},
            summarize(history["to_learn_acc"], history["ntf_acc"]), wall, written,
            {"to_learn": ev["to_learn_per_fact"], "ntf": ev["ntf_per_fact"]})
        if epoch_log is not None:  # this epoch's numbers now: a run stopped later still reports it
            epoch_log.append({**report.flat(), "eval_seconds": eval_seconds, **(trained or {}),
                              **device_memory(setup.device)})
        for cb in callbacks:
            cb.on_report(report)

    if start_epoch == 0:
        finish_epoch(0, None, None)
        start_epoch = 1
    lengths = [len(d.input_ids) for d in setup.docs] if grouping else None
    for epoch in range(start_epoch, cfg.train.epochs + 1):
        batches = epoch_batches(len(setup.docs), cfg.train.batch_size, seeds.batch_order(cfg.seed, epoch), lengths)
        # the steps' statistics stay on the device until the epoch ends (no host sync per step; trainables/step.py)
        stats, t0 = EpochStats(f"epoch {epoch}"), time.perf_counter()
        for step, idx in enumerate(batches):
            gen = torch.Generator().manual_seed(seeds.step(cfg.seed, epoch, step))
            docs = [setup.docs[i] for i in idx]
            loss = stats.add(micro.run(lambda size: train_step_stats(setup, optimizer, docs, gen, dp,
                                                                     replay_round=epoch, step=step,
                                                                     micro_batch_size=size),
                                       docs, f"epoch {epoch}, step {step}", generator=gen))
            for cb in callbacks:
                cb.on_step(epoch, step, len(batches), loss)
        losses, weights, n_tok = stats.finish()
        seconds = time.perf_counter() - t0
        train_tokens += n_tok
        train_seconds += seconds
        finish_epoch(epoch, mean(losses), mean(weights), {"train_seconds": seconds, "train_tokens": n_tok,
                                                          "steps": len(batches)})

    metrics = dict(history)
    metrics.update(summarize(history["to_learn_acc"], history["ntf_acc"]))
    metrics.update({
        "wall_seconds": wall_before + time.perf_counter() - t_start,
        "train_tokens": train_tokens,
        "train_tokens_per_second": train_tokens / train_seconds if train_seconds else None,
        **({"oom_events": micro.events} if micro.events else {}),
        **{k: v for k, v in info.items() if k not in ("start_epoch", "resumed_from", "restored")},
        "config": cfg_dict,
    })
    if out is not None and writer:
        write_json_atomic(out / "metrics.json", metrics)
    return metrics


__all__ = ["continual_update", "prepare_run", "Callback", "Report", "RunSetup"]
