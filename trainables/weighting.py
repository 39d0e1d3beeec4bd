"""Token-weighting schemes (ALGORITHM.md §2): the "which w" axis of every CKL method.

A scheme is a class registered under a name; it is built once per run from the weighting config
and an environment (:class:`SchemeEnv`), then called once per training batch with a
:class:`WeightContext`. It returns ``[B, T-1]`` weights, one per loss term (entry t weights the term
predicting x_{t+1}), without gradient. Several schemes compose multiplicatively
(``scheme: train_attention*known_mask``), and the result is always multiplied by the prediction mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .component import Component
from .config import WeightingConfig, scheme_names
from .errors import InputError
from .loss import prediction_mask
from .registry import SCHEMES
from .train_attention import load_phi


@dataclass
class SchemeEnv:
    """What a scheme may need beyond the batch, supplied by the loop that owns the models."""

    tokenizer: object = None
    device: object = "cpu"
    # nll of the frozen reference model θ_ref (the initial θ) on a batch: (input_ids, attention_mask) -> [B, T-1]
    reference_model_nll: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None


@dataclass
class WeightContext:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    nll: torch.Tensor  # [B, T-1] per-token loss of the current θ, detached
    logits: Optional[torch.Tensor] = None  # [B, T, V] current θ, detached
    object_mask: Optional[torch.Tensor] = None  # [B, T] 1 on the object's tokens (last occurrence)
    generator: Optional[torch.Generator] = None  # seeded per step (random scheme)
    _cache: dict = field(default_factory=dict)

    @property
    def pred_mask(self) -> torch.Tensor:
        return prediction_mask(self.attention_mask)


class Scheme(Component):
    """Base class. ``needs_reference_model``: the loop must supply ``env.reference_model_nll``;
    ``needs_logits``: the context carries θ's logits."""

    needs_logits = False

    def __init__(self, options: WeightingConfig, env: SchemeEnv):
        self.options = options
        self.env = env

    def __call__(self, ctx: WeightContext) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


@SCHEMES.register("uniform")
class Uniform(Scheme):
    """w_t = 1: plain fine-tuning."""

    def __call__(self, ctx):
        return ctx.pred_mask


@SCHEMES.register("oracle")
class Oracle(Scheme):
    """w_t = 1 where x_{t+1} is a token of the object string in D (its last occurrence), else 0."""

    def __call__(self, ctx):
        if ctx.object_mask is None:
            raise ValueError("the oracle scheme needs the object mask of each document")
        return ctx.object_mask[:, 1:].to(torch.float32) * ctx.pred_mask


@SCHEMES.register("known_mask")
class KnownMask(Scheme):
    """w_t = 0 where argmax p_θ(·|x_{<=t}) already equals x_{t+1}, else 1 (recomputed every step)."""

    needs_logits = True

    def __call__(self, ctx):
        pred = ctx.logits[:, :-1, :].argmax(dim=-1)
        known = (pred == ctx.input_ids[:, 1:]).to(torch.float32)
        return (1.0 - known) * ctx.pred_mask


@SCHEMES.register("rho1")
class Rho1(Scheme):
    """RHO-1: keep the top (1-k) fraction of each sequence's real tokens ranked by the excess loss
    l_t(θ) - l_t(θ_ref) (θ_ref = the frozen initial model). Normalisation: by Σw, like every scheme
    here (§1), which for a sequence of n real tokens equals ceil((1-k)·n)."""

    needs_reference_model = True

    def __call__(self, ctx):
        if self.env.reference_model_nll is None:
            raise ValueError("the rho1 scheme needs a reference model")
        ref = ctx._cache.get("ref_nll")
        if ref is None:
            ref = ctx._cache["ref_nll"] = self.env.reference_model_nll(ctx.input_ids, ctx.attention_mask)
        mask = ctx.pred_mask
        excess = torch.where(mask > 0, ctx.nll - ref, torch.full_like(ctx.nll, -math.inf))
        w = torch.zeros_like(mask)
        keep_frac = 1.0 - self.options.rho1.k
        for b in range(mask.size(0)):
            n = int(mask[b].sum().item())
            keep = int(math.ceil(keep_frac * n)) if n else 0
            if keep:
                # stable sort: ties broken by position, so the selection is deterministic
                order = torch.sort(excess[b], descending=True, stable=True).indices[:keep]
                w[b, order] = 1.0
        return w * mask


@SCHEMES.register("random")
class Random(Scheme):
    """A control: i.i.d. uniform(0,1) weights, or Bernoulli(p) weights; with ``random.match`` set,
    p is the per-sequence mean weight of that matched scheme (same number of effective tokens,
    different tokens)."""

    def __init__(self, options, env):
        super().__init__(options, env)
        match = options.random.match
        self.match_scheme = SCHEMES.get(match)(options, env) if match else None
        self.needs_reference_model = bool(self.match_scheme and self.match_scheme.needs_reference_model)
        self.needs_logits = bool(self.match_scheme and self.match_scheme.needs_logits)

    def __call__(self, ctx):
        mask = ctx.pred_mask
        u = torch.rand(mask.shape, generator=ctx.generator)
        if self.options.random.mode == "uniform" and self.match_scheme is None:
            return u * mask
        if self.match_scheme is not None:
            ref_w = self.match_scheme(ctx)
            p = (ref_w.sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp_min(1.0))
        else:
            p = torch.full((mask.size(0), 1), self.options.random.p)
        return (u < p).to(torch.float32) * mask


@SCHEMES.register("train_attention")
class TrainAttentionScheme(Scheme):
    """TAALM: the weight of the loss term predicting x_{t+1} is sigmoid(φ(x)_{t+1}), φ's output once it
    has read x_{t+1} (the release's alignment), from a frozen φ checkpoint (``weighting.train_attention.phi``)."""

    def __init__(self, options, env):
        super().__init__(options, env)
        if not options.train_attention.phi:
            raise InputError("weighting.train_attention.phi", "the train_attention scheme needs a φ checkpoint "
                                                              "directory (written by `taalm meta-train`)")
        self.phi, self.meta = load_phi(options.train_attention.phi, env.tokenizer, env.device)

    def __call__(self, ctx):
        with torch.no_grad():
            return self.phi.weights(ctx.input_ids, ctx.attention_mask).float()


class Composite(Component):
    """The product of several schemes' weights, times the prediction mask (the run's weighting component)."""

    def __init__(self, schemes: list[Scheme]):
        self.schemes = schemes
        self.needs_reference_model = any(s.needs_reference_model for s in schemes)
        self.needs_logits = any(s.needs_logits for s in schemes)

    def __call__(self, ctx: WeightContext) -> torch.Tensor:
        with torch.no_grad():
            w = ctx.pred_mask.clone()
            for s in self.schemes:
                w = w * s(ctx)
        return w


def build_weighting(options: WeightingConfig, env: SchemeEnv) -> Composite:
    return Composite([SCHEMES.get(n, "weighting.scheme")(options, env) for n in scheme_names(options.scheme)])
