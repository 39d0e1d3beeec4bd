"""Replay methods (the replay axis): what is mixed into each batch, plus its extra loss.

* ``mix_review`` (Mix-review): every batch of n new documents gets round(ratio·n) replayed documents,
  trained with the plain (uniform-weight) LM loss.
* ``gere`` (GeRe): replay a fixed general set and constrain the hidden states on it to the original
  model's: threshold-margin loss mean(relu(|h - h_ref| - τ)) (``margin``), or KL on logits, L1, L2.
* ``seekr`` (SEEKR): replay a small buffer and distil the attention maps of the ``head_budget`` heads
  ranked highest by forgettability (how much a head's attention on replay data moves after a trial
  update on the new data) and task sensitivity (|Σ ∂L_replay/∂A ⊙ A|, first-order importance).

The replay pool is ``disjoint`` by default (evidence of LAMA-CKL facts outside TO-LEARN and
NOT-TO-FORGET: Wikipedia text, never the evaluation set), ``ntf`` (the release's choice: the
NOT-TO-FORGET evidence itself, which leaks the evaluation set; labelled as such), or a JSON-lines file
with a ``text`` field per line. The reference model (the frozen initial θ) is LoRA with adapters
disabled, or a frozen copy for full fine-tuning and K-Adapter.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

import torch
from pydantic import BaseModel, ConfigDict

from . import seeds
from .component import Component
from .config import ReplayConfig
from .data import read_jsonl_validated
from .encode import EncodedDoc, collate, encode_document
from .errors import InputError
from .loss import prediction_mask, token_nll, weighted_loss
from .registry import REPLAYS


class TextRecord(BaseModel):
    model_config = ConfigDict(extra="allow")
    text: str


def load_pool_texts(pool: str, split, lama, key: str = "replay.pool") -> tuple[list[str], str]:
    """The texts of a pool of general / old documents, and a description for the metrics: ``disjoint``,
    ``ntf`` or a JSON-lines file (see the module docstring). ``split``/``lama`` are None outside LAMA-CKL
    (TemporalWiki), where only a file pool applies; ``key`` names the config key in errors."""
    if pool in ("disjoint", "ntf") and (split is None or lama is None):
        raise InputError(key, f"the {pool!r} pool is LAMA-CKL evidence; outside LAMA-CKL (TemporalWiki) "
                              "give a JSON-lines file with a `text` field")
    if pool == "disjoint":
        taken = {f.uuid for f in split.to_learn} | {f.uuid for f in split.ntf}
        facts = sorted((f for f in lama.all_facts() if f.uuid not in taken), key=lambda f: f.uuid)
        return [f.evidence for f in facts], "disjoint: LAMA-CKL evidence outside TO-LEARN and NOT-TO-FORGET"
    if pool == "ntf":
        return [f.evidence for f in split.ntf], "ntf (LEAKY: the NOT-TO-FORGET evidence, as the release did)"
    rows = read_jsonl_validated(Path(pool), TextRecord)
    return [r.text for _, r in rows], f"file: {pool}"


class Replay(Component):
    """Base class: a replay method samples documents from its pool into every batch (``sample``; they are
    trained with the plain LM loss) and may add a loss on them (``extra_loss``). ``none`` replays nothing."""

    needs_hidden = False  # θ's forward returns hidden states (for extra_loss)
    needs_attentions = False

    def __init__(self, cfg: ReplayConfig, seed: int):
        self.cfg, self.seed = cfg, seed
        self.docs: list[EncodedDoc] = []
        self.description: Optional[str] = None

    def setup(self, run) -> None:
        """Read and encode the pool (its seeded subsample when ``replay.size`` is set)."""
        texts, self.description = load_pool_texts(self.cfg.pool, run.split, run.lama)
        if self.cfg.size is not None and self.cfg.size < len(texts):
            texts = random.Random(seeds.replay_pool(self.seed)).sample(texts, self.cfg.size)
        self.docs = [encode_document(run.tokenizer, t, "", run.cfg.train.max_length) for t in texts if t.strip()]
        if not self.docs:
            raise InputError("replay.pool", "the replay pool is empty")

    def sample(self, n_new: int, epoch: int, step: int) -> list[EncodedDoc]:
        k = max(1, round(self.cfg.ratio * n_new))
        rng = random.Random(seeds.replay_sample(self.seed, epoch, step))
        return [self.docs[i] for i in rng.sample(range(len(self.docs)), min(k, len(self.docs)))]

    def describe(self) -> dict:
        return {"replay_pool": self.description}


@REPLAYS.register("none")
class NoReplay(Replay):
    def setup(self, run) -> None:
        pass

    def sample(self, n_new, epoch, step):
        return []

    def describe(self) -> dict:
        return {}


@REPLAYS.register("mix_review")
class MixReview(Replay):
    pass


@REPLAYS.register("gere")
class GeRe(Replay):
    needs_reference_model = True

    @property
    def needs_hidden(self):
        return self.cfg.gere.loss != "kl"

    def layers(self, n_states: int) -> list[int]:
        return self.cfg.gere.layers or [n_states - 1]

    def extra_loss(self, run, out, batch):
        rows = replayed_rows(batch)
        if rows is None:
            return None
        g = self.cfg.gere
        ids, mask = batch["input_ids"][rows], batch["attention_mask"][rows]
        ref = run.reference_model(ids, mask, hidden=g.loss != "kl")
        if g.loss == "kl":
            logp = torch.log_softmax(out.logits[rows].float(), -1)
            ref_logp = torch.log_softmax(ref.logits.float(), -1)
            kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
            return g.coef * (kl * mask).sum() / mask.sum()
        layers = self.layers(len(out.hidden_states))
        total = sum(feature_penalty(out.hidden_states[i][rows], ref.hidden_states[i], mask, g.loss, g.threshold)
                    for i in layers)
        return g.coef * total / len(layers)


def feature_penalty(h: torch.Tensor, h_ref: torch.Tensor, mask: torch.Tensor, kind: str,
                    threshold: float = 0.0) -> torch.Tensor:
    """GeRe's constraint of hidden states ``h`` [B, T, H] to the frozen model's ``h_ref`` on real tokens:
    ``margin`` = threshold-margin mean(relu(|h - h_ref| - τ)) (zero while every feature stays within τ),
    ``l1`` mean |h - h_ref|, ``l2`` mean (h - h_ref)²; means over real tokens and features. In float32 at least
    (bf16 hidden states under autocast: a bf16 sum of the mask counts exactly only up to 256)."""
    dtype = torch.promote_types(h.dtype, torch.float32)
    m = mask.unsqueeze(-1).to(dtype)
    d = (h.to(dtype) - h_ref.to(dtype)) * m
    if kind == "margin":
        pen = torch.relu(d.abs() - threshold)
    elif kind == "l1":
        pen = d.abs()
    else:
        pen = d * d
    return pen.sum() / (m.sum() * d.size(-1))


@REPLAYS.register("seekr")
class Seekr(Replay):
    needs_attentions = True
    needs_reference_model = True

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.heads: list[tuple[int, int]] = []
        self.scores: dict = {}

    def _batches(self, n: int, pad: int):
        rng = random.Random(seeds.seekr_probe(self.seed))
        for _ in range(self.cfg.seekr.probe_batches):
            yield collate([self.docs[i] for i in rng.sample(range(len(self.docs)), min(n, len(self.docs)))], pad)

    def setup(self, run) -> None:
        """Read the pool, then rank heads by forgettability and task sensitivity; keep the top ``head_budget``."""
        super().setup(run)
        model, trainable, device = run.model, run.trainable, run.device
        pad = run.pad_id
        batches = [{k: v.to(device) for k, v in b.items()}
                   for b in self._batches(run.cfg.train.batch_size, pad)]
        sens = None
        before = []
        was = model.training
        model.eval()
        for b in batches:
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_attentions=True)
            attn = out.attentions
            loss = weighted_loss(token_nll(out.logits, b["input_ids"], b["attention_mask"]),
                                 prediction_mask(b["attention_mask"]))
            s = head_sensitivity(torch.autograd.grad(loss, attn, allow_unused=True), attn)
            sens = s if sens is None else sens + s
            before.append([a.detach() for a in attn])
        # trial update on the new documents (restored afterwards): which heads' attention moves
        saved = {k: p.detach().clone() for k, p in trainable.items()}
        new = collate(run.docs[: run.cfg.train.batch_size], pad)
        new = {k: v.to(device) for k, v in new.items()}
        out = model(input_ids=new["input_ids"], attention_mask=new["attention_mask"])
        loss = weighted_loss(token_nll(out.logits, new["input_ids"], new["attention_mask"]),
                             prediction_mask(new["attention_mask"]))
        grads = torch.autograd.grad(loss, list(trainable.values()), allow_unused=True)
        with torch.no_grad():
            for p, g in zip(trainable.values(), grads):
                if g is not None:
                    p.add_(g, alpha=-run.cfg.train.lr * 10)
            forget = None
            for b, ref_attn in zip(batches, before):
                attn = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                             output_attentions=True).attentions
                f = torch.stack([(a - r).abs().mean(dim=(0, 2, 3)) for a, r in zip(attn, ref_attn)])
                forget = f if forget is None else forget + f
            for k, p in trainable.items():
                p.copy_(saved[k])
        model.train(was)

        def norm(x):
            return (x - x.min()) / (x.max() - x.min() + 1e-12)

        a = self.cfg.seekr.alpha
        score = a * norm(forget) + (1 - a) * norm(sens)
        self.scores = {"forgettability": forget.tolist(), "sensitivity": sens.tolist(), "score": score.tolist()}
        flat = score.flatten()
        top = torch.sort(flat, descending=True, stable=True).indices[: self.cfg.seekr.head_budget].tolist()
        n_heads = score.size(1)
        self.heads = sorted((i // n_heads, i % n_heads) for i in top)

    def extra_loss(self, run, out, batch):
        rows = replayed_rows(batch)
        if rows is None or not self.heads:
            return None
        ids, mask = batch["input_ids"][rows], batch["attention_mask"][rows]
        ref = run.reference_model(ids, mask, attentions=True)
        return self.cfg.seekr.coef * attention_distillation([a[rows] for a in out.attentions], ref.attentions,
                                                            self.heads, mask)

    def describe(self) -> dict:
        return {**super().describe(), "seekr_heads": self.heads}


def head_sensitivity(grads, attn) -> torch.Tensor:
    """SEEKR's task sensitivity of every head, [layers, heads]: |Σ ∂L/∂A ⊙ A| over a batch's attention maps (a layer
    the loss does not reach: 0, on the maps' device)."""
    return torch.stack([(g * a).sum(dim=(0, 2, 3)).abs() if g is not None
                        else torch.zeros(a.size(1), dtype=a.dtype, device=a.device)
                        for g, a in zip(grads, attn)]).detach()


def attention_distillation(attn, ref_attn, heads: list[tuple[int, int]], mask: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the selected heads' attention maps (only these heads enter), in float32 at least
    (bf16 attention maps under autocast: a bf16 sum of the B·T² real pairs counts exactly only up to 256)."""
    dtype = torch.promote_types(attn[0].dtype, torch.float32)
    m = mask.to(dtype)
    pair = m.unsqueeze(-1) * m.unsqueeze(-2)  # [B, T, T] real query/key pairs
    total = 0.0
    for layer, head in heads:
        d = attn[layer][:, head].to(dtype) - ref_attn[layer][:, head].to(dtype)
        total = total + (d * d * pair).sum() / pair.sum()
    return total / len(heads)


def replayed_rows(batch: dict) -> Optional[slice]:
    """The replayed documents' rows of a training batch (they come last: ``batch["n_new"]`` new ones first), or None
    when there are none. A slice, not a boolean mask: indexing with a mask reads it on the host (a device sync)."""
    n_new, n = batch.get("n_new"), batch["input_ids"].size(0)
    if n_new is None:  # a batch built outside train_step: its boolean rows, read once
        rows = batch["replay_rows"]
        return rows if bool(rows.any()) else None
    return slice(n_new, n) if n_new < n else None


def build_replay(cfg: ReplayConfig, seed: int) -> Replay:
    """The run's replay method (``none`` replays nothing); its pool is read in ``setup(run)``."""
    return REPLAYS.get(cfg.kind, "replay.kind")(cfg, seed)
