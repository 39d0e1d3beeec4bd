"""What a check of Train-Attention φ measures (meta-training's validation and its finish step):

* :func:`validate_phi`: θ_0 trained on held-out evidence with φ's weights (the inner update of
  :class:`~trainables.bilevel.Inner`, first-order), then probe accuracy on those facts (the release's validation);
* :func:`weight_focus`: where φ puts its weight: the share landing on the loss terms that predict object tokens,
  beside uniform weights' share and the oracle's;
* :func:`heatmap_html`: φ's weights over documents as a page.
"""

from __future__ import annotations

import html
from typing import Sequence

import torch
from torch.func import functional_call

from .bilevel import Inner, MetaExample
from .encode import EncodedDoc, collate
from .loss import prediction_mask
from .metrics import mean, probe_scores
from .train_attention import TrainAttention


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
    """θ_0 trained on the held-out evidence with φ's weights for val_dummy_loop + 1 epochs (one first-order
    inner update per batch), then probe accuracy; and where φ puts its weight on those documents
    (:func:`weight_focus`)."""
    o = inner.opts
    docs = [EncodedDoc(ex.doc["input_ids"][0].tolist(), ex.doc["object_mask"][0].tolist()) for ex in examples]
    focus = weight_focus(phi, docs, tokenizer.pad_token_id, device, o.val_batch_size)
    params, state = inner.initial()
    for epoch in range(o.val_dummy_loop + 1):
        for i in range(0, len(docs), o.val_batch_size):
            b = {k: v.to(device) for k, v in collate(docs[i:i + o.val_batch_size], tokenizer.pad_token_id).items()}
            with torch.no_grad():
                w = inner.phi_weights(phi, b["input_ids"], b["attention_mask"])
            params, state = inner.adapt(params, state,
                                        lambda p, ww: inner.doc_loss(p, b["input_ids"], b["attention_mask"], ww),
                                        w, first_order=1, differentiable=0)
    params = {k: v.detach() for k, v in params.items()}
    # judged in fp32 whatever meta.precision (trainables/metrics.py: bf16 ties change which probes count as right)
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
