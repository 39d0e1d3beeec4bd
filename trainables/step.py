"""One optimisation step of θ and the batches of an epoch: what the continual loop and TemporalWiki share.

* :func:`epoch_batches`: the seeded order of an epoch's documents, optionally grouped by length
  (``train.group_by_length``: fewer padding tokens; a different, equally seeded order).
* :func:`train_step`: one weighted update on a global batch, in micro-batches when asked
  (``train.micro_batch_size``: gradient accumulation; the batch's loss is the same mean over its sequences), under
  ``train.precision`` (``bf16``: autocast of the forward passes, fp32 weights and optimizer).
* :class:`MicroBatching`: ``train.oom``: a CUDA out-of-memory inside a step either fails the run with the size that
  did not fit (``fail``) or retries the step in micro-batches of half the size (``halve_batch``), recorded.
"""

from __future__ import annotations

import logging
import math
from typing import Optional, Sequence

import torch

from .encode import EncodedDoc, collate
from .errors import first_line
from .loss import EPS, token_nll, weighted_loss
from .precision import autocast  # noqa: F401 (re-exported: the loops take it from here)
from .weighting import WeightContext

log = logging.getLogger(__name__)


def epoch_batches(n: int, batch_size: int, order_seed: int, lengths: Optional[Sequence[int]] = None,
                  window: int = 64) -> list[list[int]]:
    """The batches of one epoch: a permutation of ``n`` documents seeded by ``order_seed`` (from trainables/seeds.py),
    cut into batches. With ``lengths``: the permutation is cut into windows of ``window`` batches, each window
    sorted by document length (stable) and cut into batches, and the batches' order shuffled by the same
    generator: batches of similar lengths (less padding), every document once, still a seeded order."""
    g = torch.Generator().manual_seed(order_seed)
    perm = torch.randperm(n, generator=g).tolist()
    if lengths is None:
        return [perm[i:i + batch_size] for i in range(0, n, batch_size)]
    span = batch_size * window
    batches = []
    for i in range(0, n, span):
        part = sorted(perm[i:i + span], key=lambda j: lengths[j])
        batches += [part[k:k + batch_size] for k in range(0, len(part), batch_size)]
    order = torch.randperm(len(batches), generator=g).tolist()
    return [batches[k] for k in order]


def _split(docs: list, parts: int) -> list[list]:
    """``docs`` in ``parts`` contiguous, near-equal pieces (as data parallelism shards a batch)."""
    n = len(docs)
    return [docs[n * i // parts:n * (i + 1) // parts] for i in range(parts)]


# ``setup`` is a trainables.continual.RunSetup, ``dp`` its DataParallel (not imported: continual imports this module)
def train_step(setup, optimizer, batch_docs: list[EncodedDoc], generator, dp=None, *, replay_round: int, step: int,
               micro_batch_size: Optional[int] = None) -> tuple[float, float, int]:
    """:func:`train_step_stats`, its statistics read on the host (one device sync): (loss, mean weight over real
    positions of the new documents, number of real tokens), all global."""
    return step_numbers(train_step_stats(setup, optimizer, batch_docs, generator, dp, replay_round=replay_round,
                                         step=step, micro_batch_size=micro_batch_size))


def step_numbers(stats: torch.Tensor) -> tuple[float, float, int]:
    """A step's statistics [4] (loss, Σw of the new documents, their real positions, real tokens) as
    (loss, mean weight, real tokens)."""
    return _numbers(stats.tolist())


def _numbers(row: list[float]) -> tuple[float, float, int]:
    loss, w, positions, tokens = row
    return loss, w / max(positions, 1.0), int(tokens)


def train_step_stats(setup, optimizer, batch_docs: list[EncodedDoc], generator, dp=None, *, replay_round: int,
                     step: int, micro_batch_size: Optional[int] = None) -> torch.Tensor:
    """One weighted update on a global batch (this worker's shard of it under data parallelism), with
    the replay method's documents mixed in and every component's extra loss added. ``replay_round`` and
    ``step`` key the replayed documents' draw: the epoch in a continual run, ``seeds.period_round(period,
    epoch)`` in TemporalWiki (so every epoch of a period replays its own documents).

    ``micro_batch_size``: the shard in micro-batches of at most that many documents, their gradients accumulated:
    each micro-batch's mean loss is scaled by its share of the global batch, so the update is the whole batch's
    (the weighted LM loss exactly; replay losses normalised per token, GeRe's and SEEKR's, become per-micro-batch
    means, as under data parallelism; the random scheme draws its weights micro-batch by micro-batch).
    Returns the step's statistics as a float64 tensor [4] on θ's device, global (:func:`step_numbers`): nothing in
    the step waits for the device (no host sync; tests/test_gpu_path.py runs it on PyTorch's meta device)."""
    replayed = setup.replay.sample(len(batch_docs), replay_round, step)
    n_global = len(batch_docs) + len(replayed)
    mine_new = dp.shard(batch_docs) if dp else batch_docs
    mine_rep = dp.shard(replayed) if dp else replayed
    mine = len(mine_new) + len(mine_rep)
    parts = max(1, math.ceil(mine / micro_batch_size)) if micro_batch_size and mine else 1
    optimizer.zero_grad(set_to_none=True)
    # loss, Σw (new docs), real positions (new docs), real tokens
    stats = torch.zeros(4, dtype=torch.float64, device=setup.device)
    for i, (new, rep) in enumerate(zip(_split(mine_new, parts), _split(mine_rep, parts))):
        if new or rep:
            stats += _forward_backward(setup, new, rep, n_global, len(replayed), generator, dp, regularize=i == 0)
    if dp:
        for p in setup.trainable.values():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dp.all_reduce_(p.grad)
        dp.all_reduce_(stats)
    if setup.cfg.train.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(list(setup.trainable.values()), setup.cfg.train.max_grad_norm)
    optimizer.step()
    return stats


def _forward_backward(setup, new: list[EncodedDoc], rep: list[EncodedDoc], n_global: int,
                      n_replayed: int, generator, dp, regularize: bool) -> torch.Tensor:
    """Forward, weights, loss (scaled by these documents' share of the global batch) and backward of one
    (micro-)batch of new and replayed documents (the replayed ones last); returns its 4 statistics on the device."""
    mine = new + rep
    # from pageable host memory: the copy returns once staged, without waiting for the device's queue
    batch = {k: v.to(setup.device, non_blocking=True) for k, v in collate(mine, setup.pad_id).items()}
    replay, n_new = setup.replay, len(new)
    with autocast(setup.device, setup.cfg.train.precision):
        out = setup.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          output_hidden_states=replay.needs_hidden, output_attentions=replay.needs_attentions)
    nll = token_nll(out.logits, batch["input_ids"], batch["attention_mask"])
    ctx = WeightContext(batch["input_ids"], batch["attention_mask"], nll.detach(),
                        logits=out.logits.detach() if setup.weighting.needs_logits else None,
                        object_mask=batch["object_mask"], generator=generator,
                        documents=[tuple(d.input_ids) for d in mine])
    w, den = setup.weighting.weights_and_normaliser(ctx)  # den: None unless a scheme normalises itself
    w = w.to(nll.device)
    replay_rows = torch.zeros(len(mine), dtype=torch.bool, device=nll.device)
    replay_rows[n_new:] = True
    batch["replay_rows"], batch["n_new"] = replay_rows, n_new  # rows n_new: are replayed (sliced, never masked)
    if rep:  # replayed documents are trained with the plain LM loss
        w = torch.where(replay_rows.unsqueeze(1), ctx.pred_mask.to(w.dtype), w)
        if den is not None:  # ... normalised by Σw
            den = torch.where(replay_rows, w.to(nll.dtype).sum(dim=1) + EPS, den.to(nll.device, nll.dtype))
    # the global loss is a mean over the global batch's sequences: scale this part's mean
    loss = weighted_loss(nll, w, den) * (len(mine) / n_global)
    # the replay term is a mean over the replayed documents: this part's share of it; a regulariser's
    # term is one per step (the first micro-batch carries it), and the workers' gradients are summed
    extra = replay.extra_loss(setup, out, batch) if rep else None
    if extra is not None:
        loss = loss + extra * (len(rep) / max(n_replayed, 1))
    extra = setup.regularizer.extra_loss(setup, out, batch) if regularize else None
    if extra is not None:
        loss = loss + extra / (dp.world if dp else 1)
    loss.backward()
    mask = ctx.pred_mask
    return torch.stack([loss.detach().double(), w[:n_new].sum().double(), mask[:n_new].sum().double(),
                        mask.sum().double()])


class EpochStats:
    """An epoch's step statistics kept on the device, read on the host once, at the epoch's end (:meth:`finish`).
    While it runs, :meth:`add` returns the loss of the latest step whose statistics have reached the host (on CUDA a
    non-blocking copy read once its event has passed: no step waits for the device; on the CPU the step's own) and
    raises on a non-finite loss as soon as it is read."""

    def __init__(self, where: str):
        self.where = where
        self.steps: list[torch.Tensor] = []
        self.pending: list[tuple[int, torch.Tensor, Optional[object]]] = []
        self.loss = float("nan")

    def add(self, stats: torch.Tensor) -> float:
        self.steps.append(stats)
        if stats.device.type == "cuda":
            host = stats.to("cpu", non_blocking=True)  # into pinned memory, queued after the step
            event = torch.cuda.Event()
            event.record()
            self.pending.append((len(self.steps) - 1, host, event))
        else:
            self.pending.append((len(self.steps) - 1, stats, None))
        while self.pending and (self.pending[0][2] is None or self.pending[0][2].query()):
            i, host, _ = self.pending.pop(0)
            self.loss = self._check(i, float(host[0]))
        return self.loss

    def _check(self, step: int, loss: float) -> float:
        if not math.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss} at {self.where}, step {step}")
        return loss

    def finish(self) -> tuple[list[float], list[float], int]:
        """Every step's loss and mean weight, and the epoch's real tokens (one device sync)."""
        if not self.steps:
            return [], [], 0
        rows = [_numbers(r) for r in torch.stack(self.steps).tolist()]
        for i, (loss, _, _) in enumerate(rows):
            self._check(i, loss)
        return [r[0] for r in rows], [r[1] for r in rows], sum(r[2] for r in rows)


class StepOutOfMemoryError(RuntimeError):
    """A step that did not fit in the device's memory (``train.oom: fail``, or nothing left to halve)."""


class MicroBatching:
    """The micro-batch size of every step and what a CUDA out-of-memory inside a step does (``train.oom``):
    ``fail`` raises :class:`StepOutOfMemoryError` naming where and the size that did not fit; ``halve_batch``
    frees the memory, halves the micro-batch (gradient accumulation, the same update), restores the RNG states the
    failed attempt consumed and runs the step again; later steps keep the smaller size. ``events`` records each."""

    def __init__(self, policy: str, batch_size: int, micro_batch_size: Optional[int] = None):
        self.policy, self.batch_size = policy, batch_size
        self.size = min(micro_batch_size or batch_size, batch_size)
        self.events: list[dict] = []

    def run(self, fn, docs: Sequence[EncodedDoc], where: str, generator: Optional[torch.Generator] = None):
        """``fn(micro_batch_size)``: one step; returns what it returns. ``generator``: the step's own generator (the
        random scheme's), restored with torch's global ones before a retry."""
        from .checkpoint import rng_state, set_rng_state

        while True:
            rng = rng_state()
            own = generator.get_state() if generator is not None else None
            failed = None
            try:
                return fn(None if self.size >= self.batch_size else self.size)
            except torch.OutOfMemoryError as e:
                failed = first_line(e)
            width = max((len(d.input_ids) for d in docs), default=0)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            what = f"{where}: a micro-batch of {self.size} documents × up to {width} tokens did not fit ({failed})"
            if self.policy != "halve_batch" or self.size <= 1:
                raise StepOutOfMemoryError(
                    f"CUDA out of memory in {what}; " + ("train.oom: halve_batch retries with smaller micro-batches"
                                                        if self.policy != "halve_batch" else "nothing left to halve"))
            set_rng_state(rng)
            if own is not None:
                generator.set_state(own)
            smaller = math.ceil(self.size / 2)
            self.events.append({"where": where, "from": self.size, "to": smaller, "tokens": width, "error": failed})
            log.warning("CUDA out of memory in %s; the step runs again in micro-batches of %d documents (gradient "
                        "accumulation: the same update; train.oom: halve_batch)", what, smaller)
            self.size = smaller
