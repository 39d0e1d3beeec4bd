"""Token-weighting schemes (ALGORITHM.md §2): the "which w" axis of every CKL method.

A scheme is a class registered under a name; it is built once per run from the weighting config
and an environment (:class:`SchemeEnv`), then called once per training batch with a
:class:`WeightContext`. It returns ``[B, T-1]`` weights, one per loss term (entry t weights the term
predicting x_{t+1}), without gradient. Several schemes compose multiplicatively
(``scheme: train_attention*known_mask``), and the result is always multiplied by the prediction mask.

The loss of a batch normalises each sequence's Σ_t w_t·l_t by Σ_t w_t (ALGORITHM.md §1). A scheme may state a
normaliser of its own instead (``own_normaliser``, :meth:`Scheme.normaliser`): only the release-style RHO-1
does, whose loss is Σ_t w_t·l_t / (k · real tokens). In a product, that scheme's normaliser is computed on the
other schemes' weights (k · Σ_t of their product), so a product with uniform is exactly the scheme alone, and
a product with φ's weights stays independent of their scale, as Σw normalisation is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .component import Component
from .config import WeightingConfig, scheme_names
from .errors import InputError
from .loss import EPS, prediction_mask, token_nll
from .precision import autocast
from .registry import SCHEMES
from .train_attention import load_phi


@dataclass
class SchemeEnv:
    """What a scheme may need beyond the batch, supplied by the loop that owns the models."""

    tokenizer: object = None
    device: object = "cpu"
    dtype: str = "float32"  # θ's dtype (model.dtype): a reference model of a scheme's own is loaded in it
    precision: str = "fp32"  # θ's forward precision (train.precision): a reference model runs under the same autocast
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
    documents: Optional[list[tuple]] = None  # each row's real token ids, known on the host (no device read needed)
    _cache: dict = field(default_factory=dict)

    @property
    def pred_mask(self) -> torch.Tensor:
        return prediction_mask(self.attention_mask)


class Scheme(Component):
    """Base class. ``needs_reference_model``: the loop must supply ``env.reference_model_nll``;
    ``needs_logits``: the context carries θ's logits; ``own_normaliser``: the loss of a sequence is divided
    by :meth:`normaliser` instead of Σw."""

    needs_logits = False
    own_normaliser = False

    def __init__(self, options: WeightingConfig, env: SchemeEnv):
        self.options = options
        self.env = env

    def __call__(self, ctx: WeightContext) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def normaliser(self, ctx: WeightContext, others: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        """[B] per-sequence denominators of the weighted loss, given ``others`` [B, T-1]: the product of the
        prediction mask and every other scheme's weights in the run's product (the mask alone for one scheme)."""
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


def load_reference_model(path: str, env: SchemeEnv, key: str = "weighting.rho1.reference"):
    """A frozen causal LM from a local directory, in eval mode on the run's device, checked to share θ's
    tokenizer (the same vocabulary, id for id): scores of the two models are compared token by token."""
    from .config import ModelConfig
    from .models import load_base_model, load_tokenizer

    cfg = ModelConfig(name=path, dtype=env.dtype)
    try:
        tokenizer = load_tokenizer(cfg)
    except InputError as e:
        raise InputError(key, f"no tokenizer in {path}: {e.message}") from None
    if env.tokenizer is not None and tokenizer.get_vocab() != env.tokenizer.get_vocab():
        raise InputError(key, f"the tokenizer in {path} is not θ's ({len(tokenizer)} vs {len(env.tokenizer)} "
                              "tokens, or the same size with other ids): a reference model must share θ's tokenizer")
    try:
        model = load_base_model(cfg, tokenizer)
    except InputError as e:
        raise InputError(key, e.message) from None
    if model.get_output_embeddings().weight.shape[0] < len(tokenizer):
        raise InputError(key, f"the model in {path} predicts {model.get_output_embeddings().weight.shape[0]} tokens, "
                              f"fewer than its tokenizer's {len(tokenizer)}")
    return model.to(env.device).eval()


def target_probs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """p(x_{t+1} | x_{<=t}) at every position t = 0..T-2, padding included (the release's ``probs.gather``
    over the whole padded width), as a float32 [B, T-1] tensor."""
    lp = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)
    return lp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1).exp()


def index_as_rank(score: torch.Tensor, k: float) -> torch.Tensor:
    """The release's selection, taken literally: ``argsort(score, dim=-1) / L > k`` (evaluation_run.py:238-239).
    Entry j of the argsort is the *index* of the j-th smallest score; dividing it by L and comparing with k
    keeps position j when the index found at rank j lies in the last (1-k) of the row, which says nothing
    about the score at j. Ties: stable sort (the release used CUDA's unstable one)."""
    order = torch.argsort(score, dim=-1, stable=True)
    return (order / score.size(-1) > k).to(torch.float32)


@SCHEMES.register("rho1")
class Rho1(Scheme):
    """RHO-1, by one of two definitions (``weighting.rho1.selection``):

    * ``excess_loss`` (the RHO-1 paper's): keep the top (1-k) fraction of each sequence's real tokens ranked by
      the excess loss l_t(θ) - l_t(θ_ref), ties broken by position. Normalisation: by Σw, like every scheme
      here (§1), which for a sequence of n real positions equals ceil((1-k)·n).
    * ``release`` (the authors' TAALM release, evaluation_run.py ``rho_train``): score_t = p_θ(x_{t+1}) - p_ref
      over the batch's whole padded width, w_t = 1 where ``argsort(score)[t] / L > k`` (index as rank), times
      the prediction mask; loss Σ_t w_t·l_t / (k · real positions). With ``reference: initial``, p_ref is a
      table of the initial θ's probabilities (eval mode) computed once per training document before training,
      each document padded on the right to ``table_length`` (512), and a batch of width T reads the table's
      LAST T-1 entries (``original_probs[:, -len0:]``), which with right padding are the table's padding
      positions, not the document's tokens. With a reference model of its own, p_ref is that model's
      probability at the same positions of the batch (the release's ``rho_model_train``).

    θ_ref (``weighting.rho1.reference``): ``initial`` = the frozen initial θ (the loop's reference model), or a
    directory holding a causal LM with θ's tokenizer (the RHO-1 paper's reference: a model trained on
    target-like data)."""

    def __init__(self, options, env):
        super().__init__(options, env)
        o = options.rho1
        self.release = o.selection == "release"
        self.own_normaliser = self.release
        self.needs_logits = self.release
        self.needs_reference_model = o.reference == "initial"
        self.reference = None if o.reference == "initial" else load_reference_model(o.reference, env)
        self.table: dict[tuple, torch.Tensor] = {}  # release + initial: document token ids -> p_ref, padded width
        self._initial = None  # the frozen initial θ's forward (``RunSetup.reference_model``), from setup()
        self._pad_id = None

    # -- the reference's scores ----------------------------------------------------------------------------
    def _reference_nll(self, ctx) -> torch.Tensor:
        ref = ctx._cache.get("ref_nll")
        if ref is None:
            if self.reference is not None:
                with torch.no_grad(), autocast(ctx.input_ids.device, self.env.precision):
                    out = self.reference(input_ids=ctx.input_ids, attention_mask=ctx.attention_mask)
                ref = token_nll(out.logits, ctx.input_ids, ctx.attention_mask)
            elif self.env.reference_model_nll is None:
                raise ValueError("the rho1 scheme needs a reference model")
            else:
                ref = self.env.reference_model_nll(ctx.input_ids, ctx.attention_mask)
            ctx._cache["ref_nll"] = ref
        return ref

    def setup(self, run):
        """Release style with the initial θ as reference: the table over the run's training documents."""
        if self.release and self.reference is None:
            self._initial, self._pad_id = run.reference_model, run.pad_id
            self.fill_table([d.input_ids for d in run.docs], run.device)

    def fill_table(self, documents: list[list[int]], device="cpu") -> None:
        """p_ref of every not yet tabled document, padded on the right to ``table_length``, by the frozen
        initial θ (eval mode), a few documents per forward."""
        width = self.options.rho1.table_length
        todo = list(dict.fromkeys(tuple(d) for d in documents if tuple(d) not in self.table))
        if todo and self._initial is None:
            raise ValueError("the release-style rho1 table needs the run's reference model (setup)")
        per = max(1, 1024 // width)  # a forward's logits: per × width × vocabulary floats
        for i in range(0, len(todo), per):
            chunk = todo[i:i + per]
            ids = torch.full((len(chunk), width), self._pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for b, d in enumerate(chunk):
                ids[b, :len(d)] = torch.tensor(d[:width])
                mask[b, :len(d)] = 1
            ids, mask = ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
            with torch.no_grad():
                probs = target_probs(self._initial(ids, mask).logits, ids)
            for d, row in zip(chunk, probs):
                self.table[d] = row

    def _reference_probs(self, ctx) -> torch.Tensor:
        """p_ref [B, T-1] as the release compares it with p_θ."""
        if self.reference is not None:  # rho_model_train: the reference model on the batch itself
            with torch.no_grad(), autocast(ctx.input_ids.device, self.env.precision):
                out = self.reference(input_ids=ctx.input_ids, attention_mask=ctx.attention_mask)
            return target_probs(out.logits, ctx.input_ids)
        docs = ctx.documents  # the training step knows them on the host; read from the device otherwise
        if docs is None:
            docs = [tuple(ctx.input_ids[b][ctx.attention_mask[b].bool()].tolist()) for b in range(ctx.input_ids.size(0))]
        self.fill_table(docs, ctx.input_ids.device)  # documents not seen at setup (replayed ones): once each
        width = ctx.input_ids.size(1) - 1
        if width > self.options.rho1.table_length - 1:
            raise ValueError(f"a batch {width + 1} tokens wide is longer than the rho1 table "
                             f"({self.options.rho1.table_length}): raise weighting.rho1.table_length")
        return torch.stack([self.table[d][-width:] for d in docs]).to(ctx.input_ids.device, non_blocking=True)

    # -- weights and normaliser ----------------------------------------------------------------------------
    def __call__(self, ctx):
        if self.release:
            score = target_probs(ctx.logits, ctx.input_ids) - self._reference_probs(ctx)
            return index_as_rank(score, self.options.rho1.k) * ctx.pred_mask
        ref = self._reference_nll(ctx)
        mask = ctx.pred_mask
        excess = torch.where(mask > 0, ctx.nll - ref.to(ctx.nll.dtype), torch.full_like(ctx.nll, -math.inf))
        # keep ceil((1-k)·n) of a row's n real positions (in float64, as Python's float), the rest -inf sorts last;
        # stable sort: ties broken by position, so the selection is deterministic. All rows at once, on the device.
        keep = torch.ceil(mask.sum(dim=1, dtype=torch.float64) * (1.0 - self.options.rho1.k))
        order = torch.sort(excess, dim=1, descending=True, stable=True).indices
        positions = torch.arange(order.size(1), device=order.device).expand_as(order)
        rank = torch.empty_like(order).scatter_(1, order, positions)  # each position's place in its row's order
        return (rank < keep.unsqueeze(1)).to(mask.dtype) * mask

    def normaliser(self, ctx, others):
        """The release's k · (real tokens) (evaluation_run.py:245), counting the other schemes' weight instead of
        tokens in a product; + 1e-6 as in §1, so a sequence without weight contributes 0."""
        return self.options.rho1.k * others.sum(dim=1) + EPS

    def describe(self):
        if self.release and self.reference is None:
            return {"rho1_table_documents": len(self.table)}
        return {}


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

    def setup(self, run):
        if self.match_scheme is not None:
            self.match_scheme.setup(run)

    def describe(self):
        return self.match_scheme.describe() if self.match_scheme is not None else {}

    def __call__(self, ctx):
        mask = ctx.pred_mask
        # drawn where the step's generator lives (the CPU: the same draws on every device), used where the mask is
        at = ctx.generator.device if ctx.generator is not None else torch.device("cpu")
        u = torch.rand(mask.shape, generator=ctx.generator, device=at).to(mask.device, non_blocking=True)
        if self.options.random.mode == "uniform" and self.match_scheme is None:
            return u * mask
        if self.match_scheme is not None:
            ref_w = self.match_scheme(ctx)
            p = (ref_w.sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp_min(1.0))
        else:
            p = torch.full((mask.size(0), 1), self.options.random.p, device=mask.device)
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
        owners = [s for s in schemes if s.own_normaliser]
        if len(owners) > 1:
            raise InputError("weighting.scheme", "at most one scheme of a product may normalise the loss itself")
        self.normalising = owners[0] if owners else None

    def setup(self, run) -> None:
        for s in self.schemes:
            s.setup(run)

    def describe(self) -> dict:
        return {k: v for s in self.schemes for k, v in s.describe().items()}

    def weights_and_normaliser(self, ctx: WeightContext) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The weights [B, T-1] and, when a scheme states its own normaliser, the per-sequence denominators [B]
        (None: the loss divides by Σw, §1)."""
        with torch.no_grad():
            w = ctx.pred_mask.clone()
            parts = []
            for s in self.schemes:
                ws = s(ctx)
                parts.append(ws)
                w = w * ws
            if self.normalising is None:
                return w, None
            others = ctx.pred_mask.clone()
            for s, ws in zip(self.schemes, parts):
                if s is not self.normalising:
                    others = others * ws
            return w, self.normalising.normaliser(ctx, others)

    def __call__(self, ctx: WeightContext) -> torch.Tensor:
        return self.weights_and_normaliser(ctx)[0]


def build_weighting(options: WeightingConfig, env: SchemeEnv) -> Composite:
    return Composite([SCHEMES.get(n, "weighting.scheme")(options, env) for n in scheme_names(options.scheme)])
