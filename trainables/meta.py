"""Meta-learning Train-Attention φ (ALGORITHM.md §4), with torch.func.functional_call on parameter dicts.

Per meta-example (document D, probe T_D with its object tokens):

1. θ starts from θ_0 (its trainable parameters at initialisation; every example starts there);
2. w = sigmoid(φ(D)), once, with gradient to φ;
3. ``dummy_loop`` updates of θ on L_w(θ; D, w) with w detached and no graph (first-order), then
   ``inner_steps`` updates through a functional optimizer WITH the graph, so θ' is a function of w;
4. the objective on θ' (``phi_loss``: NLL of T_D's object tokens; ``change3`` / ``change2``: cubed /
   signed-squared change of T_D's token losses from θ_0), plus optionally λ·|Δ loss| on an unrelated probe;
5. its gradient w.r.t. φ's trainable parameters, averaged over a meta-batch, feeds AdamW on φ.

The meta-gradient is the exact derivative of that objective with the dummy-phase θ held fixed
(what the first-order dummy loop means); tests check it against central finite differences.
"""

from __future__ import annotations

import html
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch.func import functional_call

from . import seeds
from .checkpoint import write_json_atomic
from .config import DataConfig, ModelConfig, ParamsConfig, _Strict, config_to_dict
from .data import Fact, load_lama
from .encode import EncodedDoc, collate, encode_document, encode_documents
from .errors import InputError
from .functional_optim import detach_state
from .loss import prediction_mask, token_nll, weighted_loss
from .metrics import EncodedProbe, encode_probe, mean, probe_scores
from .registry import INNER_OPTIMIZERS
from .tailor import build_split
from .theta import build_theta, resolve_device
from .train_attention import PhiConfig, TrainAttention, build_phi, phi_trainable, save_phi

log = logging.getLogger(__name__)


class MetaOptions(_Strict):
    steps: int = Field(100, ge=0)
    # passes over the Train-Attention pool (as the release trains); when set, it decides the number of
    # steps: epochs × ceil(n_train / batch_size). Either way examples are drawn epoch by epoch, each
    # example once per pass, in a seeded order.
    epochs: Optional[int] = Field(None, ge=1)
    batch_size: int = Field(16, ge=1)  # meta-batch: examples whose φ-gradients are averaged
    lr: float = Field(2e-4, gt=0)  # AdamW on φ
    weight_decay: float = Field(0.0, ge=0)
    inner_optimizer: str = "adamw"  # a name of trainables.registry.INNER_OPTIMIZERS: sgd, adam, adamw
    inner_lr: float = Field(2e-4, gt=0)
    dummy_loop: int = Field(1, ge=0)
    inner_steps: int = Field(1, ge=1)
    objective: Literal["phi_loss", "change3", "change2"] = "phi_loss"
    restrict_unrelated: float = Field(0.0, ge=0)  # λ of |l(θ') - l(θ_0)| on an unrelated probe
    max_length: int = Field(512, ge=8)
    val_every: int = Field(10, ge=1)
    val_size: int = Field(16, ge=1)
    val_dummy_loop: int = Field(3, ge=0)  # validation trains val_dummy_loop + 1 epochs
    val_batch_size: int = Field(8, ge=1)
    pool_size: Optional[int] = Field(None, ge=2)  # subsample the Train-Attention pool
    # "vmap": the meta-batch's inner loops run together (torch.func.vmap over per-example θ, documents
    # padded to the batch's longest), the same mathematics as "sequential" (one example after another);
    # falls back to sequential, with a logged reason, where it cannot batch
    batching: Literal["vmap", "sequential"] = "vmap"
    # vmap: examples per vmapped group; the groups' φ-gradients are summed into the meta-batch's mean (the
    # same mathematics; the second-order graph alive at once, hence the peak memory, scales with the group)
    vmap_chunk: Optional[int] = Field(None, ge=1)

    @field_validator("inner_optimizer")
    @classmethod
    def _known_optimizer(cls, v: str) -> str:
        return INNER_OPTIMIZERS.check(v)


class MetaConfig(_Strict):
    seed: int = 0
    device: str = "auto"
    model: ModelConfig = ModelConfig()
    params: ParamsConfig = ParamsConfig(kind="lora", r=8, alpha=16, dropout=0.0)
    phi: PhiConfig = PhiConfig()
    data: DataConfig = DataConfig()
    meta: MetaOptions = MetaOptions()
    task: Literal["descriptive", "schematic"] = "descriptive"
    # meta-examples from a JSON-lines file of {text, subject, relation, object} (e.g. TemporalWiki) instead of
    # the tailored LAMA-CKL Train-Attention pool; the probe is the schematic "Guess the object" sentence
    records: Optional[str] = None


class MetaRecord(BaseModel):
    model_config = ConfigDict(extra="allow")
    text: str
    subject: str
    relation: str
    object: str


def record_facts(path: str) -> list[Fact]:
    from .data import read_jsonl_validated
    from .temporalwiki import probe_sentence

    facts = []
    for line, r in read_jsonl_validated(Path(path), MetaRecord):
        if r.object not in r.text:
            raise InputError(f"{path}:{line}", f"field 'object': {r.object!r} does not occur in the text")
        probe = probe_sentence(r.subject, r.relation, r.object)
        facts.append(Fact(f"record-{line}", r.subject, r.relation, r.object, r.text, probe, probe,
                          Path(path).stem, line))
    return facts


# --------------------------------------------------------------------------------------------


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
    """θ as a function of a parameter dict: the weighted LM loss and probe losses, via functional_call."""

    def __init__(self, model: torch.nn.Module, theta0: dict[str, torch.Tensor], opts: MetaOptions, pad_id: int = 0):
        self.model = model
        self.pad_id = pad_id  # pads a meta-batch's documents and probes when it is vmapped
        self.theta0 = {k: v.detach().clone() for k, v in theta0.items()}
        self.keys = list(self.theta0)
        self.opts = opts
        cls = INNER_OPTIMIZERS.get(opts.inner_optimizer, "meta.inner_optimizer")
        self.optimizer = cls(lr=opts.inner_lr)
        self.batching_off: Optional[str] = None  # why the meta-batch is not vmapped (set on a failure)
        self.logged: set[str] = set()

    def nll(self, params, ids, mask) -> torch.Tensor:
        logits = functional_call(self.model, params, args=(), kwargs={"input_ids": ids, "attention_mask": mask}).logits
        return token_nll(logits, ids, mask)

    def doc_loss(self, params, doc, w) -> torch.Tensor:
        return weighted_loss(self.nll(params, doc["input_ids"], doc["attention_mask"]), w)

    def _grads(self, loss, params, create_graph):
        g = torch.autograd.grad(loss, [params[k] for k in self.keys], create_graph=create_graph)
        return dict(zip(self.keys, g))

    def dummy_phase(self, doc, w: torch.Tensor, start: Optional[dict] = None):
        """``dummy_loop`` first-order updates with detached weights; returns (params, optimizer state)."""
        params = {k: v.detach().clone().requires_grad_(True) for k, v in (start or self.theta0).items()}
        state = self.optimizer.init(params)
        for _ in range(self.opts.dummy_loop):
            g = self._grads(self.doc_loss(params, doc, w.detach()), params, create_graph=False)
            with torch.no_grad():
                params, state = self.optimizer.step(params, g, state)
            params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
            state = detach_state(state)
        return params, state

    def differentiable_phase(self, params, state, doc, w: torch.Tensor):
        """``inner_steps`` updates that keep the graph: the result is a function of w."""
        for _ in range(self.opts.inner_steps):
            g = self._grads(self.doc_loss(params, doc, w), params, create_graph=True)
            params, state = self.optimizer.step(params, g, state)
        return params

    # ---- one example as a function of its own parameter dict (vmapped over the meta-batch) ----

    def _nll_one(self, params, ids, mask) -> torch.Tensor:
        """[T-1] token NLL of one (padded) sequence ``ids`` [T] at ``params``."""
        logits = functional_call(self.model, params, args=(),
                                 kwargs={"input_ids": ids[None], "attention_mask": mask[None]}).logits
        return token_nll(logits, ids[None], mask[None])[0]

    def _doc_loss_one(self, params, ids, mask, w) -> torch.Tensor:
        return weighted_loss(self._nll_one(params, ids, mask)[None], w[None])

    def _objective_one(self, params, ids, mask, targets, base) -> torch.Tensor:
        nll = self._nll_one(params, ids, mask)
        if self.opts.objective == "phi_loss":
            return (nll * targets).sum() / targets.sum()
        d = (nll - base) * prediction_mask(mask[None])[0].to(nll.dtype)
        n = mask[1:].sum()
        return (d ** 3).sum() / n if self.opts.objective == "change3" else (d * d.abs()).sum() / n

    def batched_objectives(self, docs: dict, w: torch.Tensor, probes: dict) -> torch.Tensor:
        """[B] objectives of a meta-batch: every example's dummy and differentiable inner updates from θ_0
        and its probe objective, all examples at once (vmap over per-example parameter dicts)."""
        from torch.func import vmap

        b = w.shape[0]
        vloss = vmap(self._doc_loss_one)

        def grads(params, weights, create_graph):
            # example b's loss depends only on its own slice params[k][b]: the gradient of the sum is the
            # stack of per-example gradients
            loss = vloss(params, docs["input_ids"], docs["attention_mask"], weights).sum()
            return self._grads(loss, params, create_graph)

        params = {k: v.detach().unsqueeze(0).expand(b, *v.shape).clone().requires_grad_(True)
                  for k, v in self.theta0.items()}
        state = self.optimizer.init(params)
        for _ in range(self.opts.dummy_loop):  # first-order: w detached, no graph kept
            g = grads(params, w.detach(), False)
            with torch.no_grad():
                params, state = self.optimizer.step(params, g, state)
            params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
            state = detach_state(state)
        for _ in range(self.opts.inner_steps):  # through the graph: θ' is a function of w
            params, state = self.optimizer.step(params, grads(params, w, True), state)
        base = torch.zeros_like(probes["targets"], dtype=w.dtype)  # θ_0's probe NLL (change3 / change2 only)
        if self.opts.objective != "phi_loss":
            with torch.no_grad():
                logits = functional_call(self.model, self.theta0, args=(), kwargs={
                    "input_ids": probes["input_ids"], "attention_mask": probes["attention_mask"]}).logits
                base = token_nll(logits, probes["input_ids"], probes["attention_mask"])
        return vmap(self._objective_one)(params, probes["input_ids"], probes["attention_mask"],
                                         probes["targets"], base)

    def objective(self, params, ex: MetaExample, unrelated: Optional[MetaExample] = None) -> torch.Tensor:
        o = self.opts
        nll = self.nll(params, ex.probe_ids, ex.probe_mask)
        if o.objective == "phi_loss":
            obj = (nll * ex.object_targets).sum() / ex.object_targets.sum()
        else:
            with torch.no_grad():
                base = self.nll(self.theta0, ex.probe_ids, ex.probe_mask)
            d = nll - base
            n = ex.probe_mask[:, 1:].sum()
            obj = (d ** 3).sum() / n if o.objective == "change3" else (d * d.abs()).sum() / n
        if o.restrict_unrelated and unrelated is not None:
            u = self.nll(params, unrelated.probe_ids, unrelated.probe_mask)
            with torch.no_grad():
                u0 = self.nll(self.theta0, unrelated.probe_ids, unrelated.probe_mask)
            obj = obj + o.restrict_unrelated * (u - u0).abs().sum() / unrelated.probe_mask[:, 1:].sum()
        return obj


def _collate_probes(batch: Sequence[MetaExample], pad_id: int) -> dict:
    width = max(ex.probe_ids.size(1) for ex in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long, device=batch[0].probe_ids.device)
    mask = torch.zeros_like(ids)
    targets = torch.zeros(len(batch), width - 1, dtype=batch[0].object_targets.dtype, device=ids.device)
    for i, ex in enumerate(batch):
        n = ex.probe_ids.size(1)
        ids[i, :n], mask[i, :n], targets[i, :n - 1] = ex.probe_ids[0], 1, ex.object_targets[0]
    return {"input_ids": ids, "attention_mask": mask, "targets": targets}


def _collate_docs(batch: Sequence[MetaExample], pad_id: int) -> dict:
    width = max(ex.doc["input_ids"].size(1) for ex in batch)
    out = {}
    for k in ("input_ids", "attention_mask", "object_mask"):
        fill = pad_id if k == "input_ids" else 0
        t = torch.full((len(batch), width), fill, dtype=torch.long, device=batch[0].doc[k].device)
        for i, ex in enumerate(batch):
            t[i, :ex.doc[k].size(1)] = ex.doc[k][0]
        out[k] = t
    return out


def _sequential_gradient(inner: Inner, phi: TrainAttention, batch: Sequence[MetaExample],
                         unrelated: Sequence[Optional[MetaExample]]) -> tuple[float, dict[str, torch.Tensor]]:
    phi_params = phi_trainable(phi)
    names = list(phi_params)
    total = {k: torch.zeros_like(p) for k, p in phi_params.items()}
    objs = []
    for i, ex in enumerate(batch):
        w = phi.weights(ex.doc["input_ids"], ex.doc["attention_mask"]).to(next(iter(inner.theta0.values())).dtype)
        params, state = inner.dummy_phase(ex.doc, w)
        params = inner.differentiable_phase(params, state, ex.doc, w)
        obj = inner.objective(params, ex, unrelated[i] if i < len(unrelated) else None)
        grads = torch.autograd.grad(obj, [phi_params[k] for k in names], allow_unused=True)
        for k, g in zip(names, grads):
            if g is not None:
                total[k] += g.detach() / len(batch)
        objs.append(obj.item())
    return mean(objs), total


def _batched_gradient(inner: Inner, phi: TrainAttention, batch: Sequence[MetaExample],
                      pad_id: int) -> tuple[float, dict[str, torch.Tensor]]:
    """The meta-batch vmapped, in groups of ``meta.vmap_chunk`` examples (default: all at once)."""
    phi_params = phi_trainable(phi)
    names = list(phi_params)
    total = {k: torch.zeros_like(p) for k, p in phi_params.items()}
    objs: list[float] = []
    size = inner.opts.vmap_chunk or len(batch)
    for i in range(0, len(batch), size):
        group = batch[i:i + size]
        docs = _collate_docs(group, pad_id)
        w = phi.weights(docs["input_ids"], docs["attention_mask"]).to(next(iter(inner.theta0.values())).dtype)
        o = inner.batched_objectives(docs, w, _collate_probes(group, pad_id))
        grads = torch.autograd.grad(o.sum() / len(batch), [phi_params[k] for k in names], allow_unused=True)
        for k, g in zip(names, grads):
            if g is not None:
                total[k] += g.detach()
        objs.extend(o.detach().tolist())
    return mean(objs), total


def meta_gradient(inner: Inner, phi: TrainAttention, batch: Sequence[MetaExample],
                  unrelated: Sequence[Optional[MetaExample]] = ()) -> tuple[float, dict[str, torch.Tensor]]:
    """Mean objective over the meta-batch and its gradient w.r.t. φ's trainable parameters: every example
    from θ_0 with its own θ', the gradient the mean over examples. ``meta.batching: vmap`` runs the
    examples together; it falls back to one example after another (logged once, with the reason) for the
    unrelated-probe term and wherever vmap fails (e.g. a quantised θ)."""
    reason = inner.batching_off
    if reason is None and inner.opts.batching == "vmap":
        if any(u is not None for u in unrelated):
            reason = "meta.restrict_unrelated is computed one example at a time"
        else:
            try:
                return _batched_gradient(inner, phi, batch, inner.pad_id)
            except (RuntimeError, NotImplementedError, TypeError, ValueError) as e:
                reason = f"vmap failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
                inner.batching_off = reason
        if reason not in inner.logged:
            inner.logged.add(reason)
            log.warning("meta-batch runs one example at a time: %s", reason)
    return _sequential_gradient(inner, phi, batch, unrelated)


class _FunctionalLM(torch.nn.Module):
    """``model`` evaluated at a parameter dict (for probe_scores)."""

    def __init__(self, model, params):
        super().__init__()
        self.inner_model, self.params = model, params

    def forward(self, input_ids, attention_mask):
        return functional_call(self.inner_model, self.params, args=(),
                               kwargs={"input_ids": input_ids, "attention_mask": attention_mask})


@torch.no_grad()
def weight_focus(phi: TrainAttention, docs: Sequence[EncodedDoc], pad_id: int, device, batch_size: int = 8) -> dict:
    """Where φ puts its weight on documents: the share of the total weight that lands on the loss terms
    predicting object tokens (``object_weight_share``), beside what uniform weights give (the object
    tokens' share of the predicted positions) and the oracle (1.0); mean weights and their ratio."""
    sums = torch.zeros(4, dtype=torch.float64)  # Σw on object terms, Σw on all, object terms, all terms
    for i in range(0, len(docs), batch_size):
        b = {k: v.to(device) for k, v in collate(docs[i:i + batch_size], pad_id).items()}
        w = phi.weights(b["input_ids"], b["attention_mask"]).double()
        real = prediction_mask(b["attention_mask"]).bool()
        is_obj = b["object_mask"][:, 1:].bool() & real
        sums += torch.stack([w[is_obj].sum(), w[real].sum(), is_obj.sum().double(), real.sum().double()]).cpu()
    w_obj, w_all, n_obj, n_all = sums.tolist()
    n_other = n_all - n_obj
    obj_mean = w_obj / n_obj if n_obj else float("nan")
    other_mean = (w_all - w_obj) / n_other if n_other else float("nan")
    return {"object_weight_share": w_obj / w_all if w_all > 0 else float("nan"),
            "uniform_share": n_obj / n_all if n_all else float("nan"), "oracle_share": 1.0,
            "object_weight": obj_mean, "other_weight": other_mean,
            "object_weight_ratio": obj_mean / other_mean if other_mean and other_mean > 0 else float("nan"),
            "n_docs": len(docs), "n_object_terms": int(n_obj)}


def validate_phi(inner: Inner, phi: TrainAttention, examples: Sequence[MetaExample], tokenizer, device) -> dict:
    """θ_0 trained on the held-out evidence with φ's weights for val_dummy_loop + 1 epochs, then probe
    accuracy; and where φ puts its weight on those documents (:func:`weight_focus`)."""
    o = inner.opts
    docs = [EncodedDoc(ex.doc["input_ids"][0].tolist(), ex.doc["object_mask"][0].tolist()) for ex in examples]
    focus = weight_focus(phi, docs, tokenizer.pad_token_id, device, o.val_batch_size)
    params = {k: v.detach().clone() for k, v in inner.theta0.items()}
    state = inner.optimizer.init(params)
    for epoch in range(o.val_dummy_loop + 1):
        for i in range(0, len(docs), o.val_batch_size):
            b = {k: v.to(device) for k, v in collate(docs[i:i + o.val_batch_size], tokenizer.pad_token_id).items()}
            with torch.no_grad():
                w = phi.weights(b["input_ids"], b["attention_mask"])
            p = {k: v.requires_grad_(True) for k, v in params.items()}
            g = inner._grads(inner.doc_loss(p, b, w.to(next(iter(p.values())).dtype)), p, create_graph=False)
            with torch.no_grad():
                params, state = inner.optimizer.step({k: v.detach() for k, v in p.items()}, g, state)
    scores = probe_scores(_FunctionalLM(inner.model, params), [ex.probe for ex in examples],
                          tokenizer.pad_token_id, 32, device)
    return {"val_acc": mean([a for a, _ in scores]), "val_em": mean([e for _, e in scores]), **focus}


def heatmap_html(phi: TrainAttention, tokenizer, examples: Sequence[MetaExample], title: str) -> str:
    """Token weights of validation documents as an HTML page (object tokens underlined)."""
    rows = []
    for ex in examples:
        ids = ex.doc["input_ids"]
        with torch.no_grad():
            w = phi.weights(ids, ex.doc["attention_mask"])[0].tolist()
        toks = ids[0].tolist()
        obj = ex.doc["object_mask"][0].tolist()
        spans = [f'<span title="first token">{html.escape(tokenizer.decode([toks[0]]))}</span>']
        for t in range(1, len(toks)):
            a = w[t - 1]
            style = f"background: rgba(220,50,30,{a:.3f});" + ("text-decoration: underline;" if obj[t] else "")
            spans.append(f'<span style="{style}" title="{a:.3f}">{html.escape(tokenizer.decode([toks[t]]))}</span>')
        rows.append(f"<p><b>{html.escape(ex.fact.subject)} / {html.escape(ex.fact.relation)} / "
                    f"{html.escape(ex.fact.object)}</b><br>{''.join(spans)}</p>")
    return (f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<h3>{html.escape(title)}</h3><p>Colour = Train-Attention weight of predicting that token "
            f"(object tokens underlined).</p>{''.join(rows)}")


def prepare_meta(cfg: MetaConfig, progress=None):
    device = resolve_device(cfg.device)
    seeds.seed_everything(cfg.seed)
    theta = build_theta(cfg.model, cfg.params, device, cfg.seed)
    tokenizer, model = theta.tokenizer, theta.model
    if cfg.records:
        from .data import data_hash

        pool = record_facts(cfg.records)
        if cfg.meta.pool_size:
            if cfg.meta.pool_size > len(pool):
                raise InputError("meta.pool_size", f"requested {cfg.meta.pool_size} facts, but {cfg.records} "
                                                   f"holds {len(pool)} records")
            pool = random.Random(seeds.meta_pool(cfg.seed)).sample(pool, cfg.meta.pool_size)
        split, lama_hash = None, data_hash([Path(cfg.records)])
    else:
        lama = load_lama(cfg.data.dir)
        data_cfg = cfg.data.model_copy(update={"task": cfg.task})
        split = build_split(data_cfg, cfg.model, lama, tokenizer, lambda: model, 32, device,
                            ta_pool_size=cfg.meta.pool_size, progress=progress)
        pool, lama_hash = list(split.ta_pool), lama.hash
    if len(pool) < cfg.meta.val_size + 1:
        raise InputError("meta.val_size", f"the Train-Attention pool has {len(pool)} facts; "
                                          f"need more than val_size={cfg.meta.val_size}")
    random.Random(seeds.meta_pool(cfg.seed)).shuffle(pool)
    val_facts, train_facts = pool[:cfg.meta.val_size], pool[cfg.meta.val_size:]
    model.eval()  # no dropout inside the meta-objective: its gradient is deterministic
    theta0 = {k: v.detach().clone() for k, v in theta.trainable.items()}
    for p in model.parameters():  # θ is a function of the parameter dicts passed to functional_call
        p.requires_grad_(False)
    phi = build_phi(cfg.phi, cfg.model, tokenizer, seed=seeds.phi_init(cfg.seed)).to(device)
    phi.train()
    task = "schematic" if cfg.records else cfg.task
    mk = lambda f: make_example(tokenizer, f, task, cfg.meta.max_length, device)  # noqa: E731
    return {"device": device, "tokenizer": tokenizer, "model": model, "theta0": theta0, "phi": phi,
            "train": [mk(f) for f in train_facts], "val": [mk(f) for f in val_facts], "split": split,
            "data_hash": lama_hash}


def meta_steps(opts: MetaOptions, n_train: int) -> int:
    """The number of meta-steps: ``epochs`` passes over the pool when given, else ``steps``."""
    return opts.epochs * -(-n_train // opts.batch_size) if opts.epochs else opts.steps


def epoch_order(n: int, batch_size: int, rng: random.Random):
    """Endless meta-batches of example indices: each pass over the pool is a fresh seeded permutation,
    cut into batches (the last one of a pass may be smaller)."""
    while True:
        perm = list(range(n))
        rng.shuffle(perm)
        for i in range(0, n, batch_size):
            yield perm[i:i + batch_size]


def meta_train(cfg: MetaConfig, out_dir: Optional[str | Path] = None,
               on_step: Optional[Callable[[dict], None]] = None) -> dict:
    """Train φ; write OUT/phi/ (best φ by validation accuracy), OUT/meta_metrics.json, OUT/heatmap.html."""
    t0 = time.perf_counter()
    out = Path(out_dir) if out_dir else None
    s = prepare_meta(cfg)
    phi, tokenizer, device = s["phi"], s["tokenizer"], s["device"]
    inner = Inner(s["model"], s["theta0"], cfg.meta, tokenizer.pad_token_id)
    opt = torch.optim.AdamW(list(phi_trainable(phi).values()), lr=cfg.meta.lr, weight_decay=cfg.meta.weight_decay)
    rng = random.Random(seeds.meta_pool(cfg.seed))
    history = {"step": [], "objective": [], "seconds": []}
    checks: list[dict] = []
    best = {"val_acc": -1.0, "step": None}

    def check(step: int):
        phi.eval()
        v = validate_phi(inner, phi, s["val"], tokenizer, device)
        phi.train()
        v["step"] = step
        checks.append(v)
        if v["val_acc"] > best["val_acc"]:
            best.update(val_acc=v["val_acc"], step=step, object_weight_ratio=v["object_weight_ratio"])
            if out is not None:
                save_phi(out / "phi", phi, cfg.phi, cfg.model, tokenizer, {
                    "data_hash": s["data_hash"], "meta_config": config_to_dict(cfg), "step": step,
                    "validation": v})
        if on_step:
            on_step({"validation": v})

    fixed = s["train"][:min(8, len(s["train"]))]  # a fixed set: the objective before and after training
    objective_before = meta_gradient(inner, phi, fixed)[0]
    n_steps = meta_steps(cfg.meta, len(s["train"]))
    batches = epoch_order(len(s["train"]), cfg.meta.batch_size, rng)
    check(0)
    for step in range(1, n_steps + 1):
        ts = time.perf_counter()
        batch = [s["train"][i] for i in next(batches)]
        unrelated = [rng.choice(s["train"]) for _ in batch] if cfg.meta.restrict_unrelated else []
        obj, grads = meta_gradient(inner, phi, batch, unrelated)
        for k, p in phi_trainable(phi).items():
            p.grad = grads[k]
        opt.step()
        opt.zero_grad(set_to_none=True)
        history["step"].append(step)
        history["objective"].append(obj)
        history["seconds"].append(time.perf_counter() - ts)
        if on_step:
            on_step({"step": step, "n_steps": n_steps, "objective": obj})
        if step % cfg.meta.val_every == 0 or step == n_steps:
            check(step)

    metrics = {"objective": history["objective"], "step_seconds": history["seconds"], "validation": checks,
               "objective_fixed_set": {"before": objective_before, "after": meta_gradient(inner, phi, fixed)[0],
                                       "n_examples": len(fixed)},
               "best_step": best["step"], "best_val_acc": best["val_acc"],
               "wall_seconds": time.perf_counter() - t0, "n_train_examples": len(s["train"]),
               "n_val_examples": len(s["val"]), "n_steps": n_steps, "data_hash": s["data_hash"],
               "config": config_to_dict(cfg)}
    best_phi = phi
    if out is not None:
        from .train_attention import load_phi

        best_phi, _ = load_phi(out / "phi", tokenizer, device)
    if s["split"] is not None and s["split"].to_learn:
        # facts outside φ's pool: the TO-LEARN evidence a continual run will train on
        docs = encode_documents(tokenizer, s["split"].to_learn, cfg.meta.max_length)
        metrics["held_out_focus"] = {"documents": "TO-LEARN evidence (outside the Train-Attention pool)",
                                     "phi_step": best["step"],
                                     **weight_focus(best_phi, docs, tokenizer.pad_token_id, device)}
    if out is not None:
        write_json_atomic(out / "meta_metrics.json", metrics)
        (out / "heatmap.html").write_text(heatmap_html(best_phi, tokenizer, s["val"],
                                                       f"Train-Attention weights (best step {best['step']})"))
    return metrics
