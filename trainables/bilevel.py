"""The bilevel core of Train-Attention meta-learning (ALGORITHM.md §4): θ's inner loop and the meta-objective as
functions of a parameter dict (torch.func.functional_call), and the meta-gradient w.r.t. φ.

Per meta-example (document D, probe T_D with its object tokens):

1. θ starts from θ_0 (its trainable parameters at initialisation; every example starts there);
2. w = sigmoid(φ(D)), once, with gradient to φ;
3. ``dummy_loop`` updates of θ on L_w(θ; D, w) with w detached and no graph (first-order), then
   ``inner_steps`` updates through a functional optimizer WITH the graph, so θ' is a function of w;
4. the objective on θ' (``phi_loss``: NLL of T_D's object tokens; ``change3`` / ``change2``: cubed /
   signed-squared change of T_D's token losses from θ_0), plus optionally λ·|Δ loss| on an unrelated probe;
5. its gradient w.r.t. φ's trainable parameters, averaged over a meta-batch, feeds AdamW on φ.

Each piece exists once (:class:`Inner`): the per-example loss and objective (what ``torch.func.vmap`` wraps
for a meta-batch, and what one example at a time calls directly) and the update (:meth:`Inner.adapt`), which
the vmapped meta-batch, the sequential one and φ's validation all run. The meta-gradient is the exact
derivative of the objective with the dummy-phase θ held fixed (what the first-order dummy loop means); tests
check it against central finite differences.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch.func import functional_call

from .data import Fact
from .encode import collate, encode_document
from .errors import first_line
from .functional_optim import detach_state
from .loss import prediction_mask, token_nll, weighted_loss
from .metrics import EncodedProbe, encode_probe, mean
from .registry import INNER_OPTIMIZERS
from .train_attention import TrainAttention, phi_trainable

log = logging.getLogger(__name__)

Params = dict[str, torch.Tensor]


@dataclass
class MetaExample:
    fact: Fact
    doc: dict  # input_ids, attention_mask, object_mask: [1, T]
    probe: EncodedProbe
    probe_ids: torch.Tensor  # [1, P]
    probe_mask: torch.Tensor  # [1, P]
    object_targets: torch.Tensor  # [1, P-1] float: 1 where position t predicts an object token


def make_example(tokenizer, fact: Fact, task: str, max_length: int, device) -> MetaExample:
    doc = collate([encode_document(tokenizer, fact.evidence, fact.object, max_length)], tokenizer.pad_token_id)
    probe = encode_probe(tokenizer, fact.probe(task), fact.object, where=f"{fact.source}.jsonl:{fact.line}")
    ids = torch.tensor([probe.input_ids])
    tgt = torch.zeros(1, ids.size(1) - 1)
    for p in probe.positions:
        tgt[0, p - 1] = 1.0
    return MetaExample(fact, {k: v.to(device) for k, v in doc.items()}, probe, ids.to(device),
                       torch.ones_like(ids).to(device), tgt.to(device))


class Inner:
    """θ as a function of a parameter dict: its losses, the meta-objective and the inner update."""

    def __init__(self, model: torch.nn.Module, theta0: Params, opts, pad_id: int = 0):
        """``opts``: the meta options (trainables.meta.MetaOptions): inner optimizer and lr, dummy_loop,
        inner_steps, objective, restrict_unrelated, vmap_chunk, batching."""
        self.model = model
        self.pad_id = pad_id  # pads a meta-batch's documents and probes when it is vmapped
        self.theta0 = {k: v.detach().clone() for k, v in theta0.items()}
        self.keys = list(self.theta0)
        self.opts = opts
        cls = INNER_OPTIMIZERS.get(opts.inner_optimizer, "meta.inner_optimizer")
        self.optimizer = cls(lr=opts.inner_lr)
        self.batching_off: Optional[str] = None  # why the meta-batch is not vmapped (set on a failure)
        self.logged: set[str] = set()

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.theta0.values())).dtype

    # ---- losses: a batch [B, T] at one parameter dict, and one example [T] (what vmap wraps) ----

    def autocast(self, device):
        """``meta.precision`` over a forward pass (trainables/step.py: autocast)."""
        from .step import autocast

        return autocast(device, getattr(self.opts, "precision", "fp32"))

    def nll(self, params: Params, ids, mask) -> torch.Tensor:
        with self.autocast(ids.device):
            logits = functional_call(self.model, params, args=(),
                                     kwargs={"input_ids": ids, "attention_mask": mask}).logits
        return token_nll(logits, ids, mask)

    def phi_weights(self, phi: TrainAttention, ids, mask) -> torch.Tensor:
        """φ's weights of documents [B, T] in θ's dtype, under ``meta.precision``."""
        with self.autocast(ids.device):
            w = phi.weights(ids, mask)
        return w.to(self.dtype)

    def doc_loss(self, params: Params, ids, mask, w) -> torch.Tensor:
        """L_w over a batch of documents (mean over sequences), θ at ``params``."""
        return weighted_loss(self.nll(params, ids, mask), w)

    def doc_loss_one(self, params: Params, ids, mask, w) -> torch.Tensor:
        """L_w of one (padded) document ``ids`` [T] with weights ``w`` [T-1]."""
        return self.doc_loss(params, ids[None], mask[None], w[None])

    def objective_one(self, params: Params, ids, mask, targets, base) -> torch.Tensor:
        """The meta-objective on one (padded) probe ``ids`` [P]: ``phi_loss`` (mean NLL of the object tokens,
        ``targets`` [P-1]) or the cubed / signed-squared change of its token losses from ``base`` (θ_0's)."""
        nll = self.nll(params, ids[None], mask[None])[0]
        if self.opts.objective == "phi_loss":
            return (nll * targets).sum() / targets.sum()
        d = (nll - base) * prediction_mask(mask[None])[0].to(nll.dtype)
        n = mask[1:].sum()
        return (d ** 3).sum() / n if self.opts.objective == "change3" else (d * d.abs()).sum() / n

    @torch.no_grad()
    def base_nll(self, ids, mask) -> torch.Tensor:
        """θ_0's token losses on probes [B, P] (the change objectives' baseline)."""
        return self.nll(self.theta0, ids, mask)

    # ---- the update ----

    def initial(self, batch: Optional[int] = None) -> tuple[Params, dict]:
        """θ_0 as a fresh leaf parameter dict (``batch``: one copy per example, for vmap) and the inner
        optimizer's initial state."""
        if batch is None:
            params = {k: v.detach().clone().requires_grad_(True) for k, v in self.theta0.items()}
        else:
            params = {k: v.detach().unsqueeze(0).expand(batch, *v.shape).clone().requires_grad_(True)
                      for k, v in self.theta0.items()}
        return params, self.optimizer.init(params)

    def grads(self, loss: torch.Tensor, params: Params, create_graph: bool) -> Params:
        g = torch.autograd.grad(loss, [params[k] for k in self.keys], create_graph=create_graph)
        return dict(zip(self.keys, g))

    def adapt(self, params: Params, state: dict, loss_of: Callable[[Params, torch.Tensor], torch.Tensor],
              w: torch.Tensor, first_order: int, differentiable: int) -> tuple[Params, dict]:
        """The inner update: ``first_order`` steps on ``loss_of(params, w)`` with w detached and no graph kept,
        then ``differentiable`` steps that keep the graph (the result is a function of w)."""
        for _ in range(first_order):
            g = self.grads(loss_of(params, w.detach()), params, create_graph=False)
            with torch.no_grad():
                params, state = self.optimizer.step(params, g, state)
            params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
            state = detach_state(state)
        for _ in range(differentiable):
            params, state = self.optimizer.step(params, self.grads(loss_of(params, w), params, True), state)
        return params, state

    def adapt_to(self, ids, mask, w: torch.Tensor) -> Params:
        """θ' of a meta-batch from θ_0: every example its own copy (vmap over the examples' documents [B, T]
        and weights [B, T-1]); example b's loss depends only on its slice, so the gradient of the sum is the
        stack of per-example gradients."""
        from torch.func import vmap

        vloss = vmap(self.doc_loss_one)
        params, state = self.initial(w.shape[0])
        params, _ = self.adapt(params, state, lambda p, ww: vloss(p, ids, mask, ww).sum(), w,
                               self.opts.dummy_loop, self.opts.inner_steps)
        return params

    def unrelated_term(self, params: Params, u: "MetaExample") -> torch.Tensor:
        """λ · |l(θ') - l(θ_0)| on an unrelated probe (``meta.restrict_unrelated``)."""
        loss = self.nll(params, u.probe_ids, u.probe_mask)
        loss0 = self.base_nll(u.probe_ids, u.probe_mask)
        return self.opts.restrict_unrelated * (loss - loss0).abs().sum() / u.probe_mask[:, 1:].sum()


def collate_probes(batch: Sequence[MetaExample], pad_id: int) -> dict:
    width = max(ex.probe_ids.size(1) for ex in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long, device=batch[0].probe_ids.device)
    mask = torch.zeros_like(ids)
    targets = torch.zeros(len(batch), width - 1, dtype=batch[0].object_targets.dtype, device=ids.device)
    for i, ex in enumerate(batch):
        n = ex.probe_ids.size(1)
        ids[i, :n], mask[i, :n], targets[i, :n - 1] = ex.probe_ids[0], 1, ex.object_targets[0]
    return {"input_ids": ids, "attention_mask": mask, "targets": targets}


def collate_docs(batch: Sequence[MetaExample], pad_id: int) -> dict:
    width = max(ex.doc["input_ids"].size(1) for ex in batch)
    out = {}
    for k in ("input_ids", "attention_mask", "object_mask"):
        fill = pad_id if k == "input_ids" else 0
        t = torch.full((len(batch), width), fill, dtype=torch.long, device=batch[0].doc[k].device)
        for i, ex in enumerate(batch):
            t[i, :ex.doc[k].size(1)] = ex.doc[k][0]
        out[k] = t
    return out


def _phi_grad(phi: TrainAttention, loss: torch.Tensor, total: dict[str, torch.Tensor], divide: int = 1) -> None:
    """Add (d loss / d φ's trainable parameters) / ``divide`` into ``total``."""
    params = phi_trainable(phi)
    grads = torch.autograd.grad(loss, [params[k] for k in total], allow_unused=True)
    for k, g in zip(total, grads):
        if g is not None:
            total[k] += g.detach() / divide


def _sequential_gradient(inner: Inner, phi: TrainAttention, batch: Sequence[MetaExample],
                         unrelated: Sequence[Optional[MetaExample]]) -> tuple[float, dict[str, torch.Tensor]]:
    """The meta-batch one example after another: the per-example functions called directly."""
    total = {k: torch.zeros_like(p) for k, p in phi_trainable(phi).items()}
    objs = []
    for i, ex in enumerate(batch):
        ids, mask = ex.doc["input_ids"][0], ex.doc["attention_mask"][0]
        w = inner.phi_weights(phi, ex.doc["input_ids"], ex.doc["attention_mask"])[0]
        params, state = inner.initial()
        params, _ = inner.adapt(params, state, lambda p, ww: inner.doc_loss_one(p, ids, mask, ww), w,
                                inner.opts.dummy_loop, inner.opts.inner_steps)
        base = None
        if inner.opts.objective != "phi_loss":
            base = inner.base_nll(ex.probe_ids, ex.probe_mask)[0]
        obj = inner.objective_one(params, ex.probe_ids[0], ex.probe_mask[0], ex.object_targets[0], base)
        u = unrelated[i] if i < len(unrelated) else None
        if inner.opts.restrict_unrelated and u is not None:
            obj = obj + inner.unrelated_term(params, u)
        _phi_grad(phi, obj, total, divide=len(batch))
        objs.append(obj.item())
    return mean(objs), total


def _batched_gradient(inner: Inner, phi: TrainAttention, batch: Sequence[MetaExample],
                      pad_id: int) -> tuple[float, dict[str, torch.Tensor]]:
    """The meta-batch vmapped, in groups of ``meta.vmap_chunk`` examples (default: all at once)."""
    from torch.func import vmap

    total = {k: torch.zeros_like(p) for k, p in phi_trainable(phi).items()}
    objs: list[float] = []
    size = inner.opts.vmap_chunk or len(batch)
    for i in range(0, len(batch), size):
        group = batch[i:i + size]
        docs, probes = collate_docs(group, pad_id), collate_probes(group, pad_id)
        w = inner.phi_weights(phi, docs["input_ids"], docs["attention_mask"])
        params = inner.adapt_to(docs["input_ids"], docs["attention_mask"], w)
        base = torch.zeros_like(probes["targets"], dtype=w.dtype)  # θ_0's probe NLL (change3 / change2 only)
        if inner.opts.objective != "phi_loss":
            base = inner.base_nll(probes["input_ids"], probes["attention_mask"])
        o = vmap(inner.objective_one)(params, probes["input_ids"], probes["attention_mask"], probes["targets"], base)
        _phi_grad(phi, o.sum() / len(batch), total)
        objs.extend(o.detach().tolist())
    return mean(objs), total


# errors that say nothing about whether vmap can batch the meta-batch: they propagate (an out-of-memory error turned
# into the sequential path would run the whole meta-training 2.5-6x slower, silently)
NOT_A_VMAP_LIMIT = (torch.OutOfMemoryError,) + ((torch.AcceleratorError,) if hasattr(torch, "AcceleratorError") else ())


def meta_gradient(inner: Inner, phi: TrainAttention, batch: Sequence[MetaExample],
                  unrelated: Sequence[Optional[MetaExample]] = ()) -> tuple[float, dict[str, torch.Tensor]]:
    """Mean objective over the meta-batch and its gradient w.r.t. φ's trainable parameters: every example
    from θ_0 with its own θ', the gradient the mean over examples. ``meta.batching: vmap`` runs the
    examples together; it falls back to one example after another (logged once, with the reason) for the
    unrelated-probe term and wherever vmap fails (e.g. a quantised θ); an out-of-memory or CUDA error is raised
    (``meta.vmap_chunk`` makes the vmapped groups smaller)."""
    reason = inner.batching_off
    if reason is None and inner.opts.batching == "vmap":
        if any(u is not None for u in unrelated):
            reason = "meta.restrict_unrelated is computed one example at a time"
        else:
            try:
                return _batched_gradient(inner, phi, batch, inner.pad_id)
            except NOT_A_VMAP_LIMIT:  # out of memory, a CUDA error: the run's failure, not vmap's (never swallowed)
                raise
            except (RuntimeError, NotImplementedError, TypeError, ValueError) as e:
                reason = f"vmap failed ({type(e).__name__}: {first_line(e)})"
                inner.batching_off = reason
        if reason not in inner.logged:
            inner.logged.add(reason)
            log.warning("meta-batch runs one example at a time: %s", reason)
    return _sequential_gradient(inner, phi, batch, unrelated)
