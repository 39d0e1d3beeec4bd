"""SEEKR's head ranking (trainables/replay.py: Seekr.setup) against values computed by hand.

A toy model whose 2 layers x 2 heads have attention maps A_{l,h} = g_{l,h} (every entry), and whose logits at
position t are S = Σ_{l,h} c_{l,h} · mean_s A_{l,h}[t, s] on one token and 0 on the V - 1 others: on the true next
token at even t, on a wrong one at odd t (so ∂L/∂A changes sign along a sequence, and |Σ ∂L/∂A ⊙ A| differs from
Σ |∂L/∂A ⊙ A|). On documents of 5 tokens (4 predicted positions, no padding), with p = e^S / (e^S + V - 1) and
S = Σ c·g, the loss (mean over sequences of the mean over positions) has Σ_{b,t} ∂L/∂S = (2·(p - 1) + 2·p) / 4
= (2p - 1) / 2, so:

* sensitivity of head k, |Σ ∂L/∂A_k ⊙ A_k| summed over the P probe batches: P · |c_k g_k| · |2p - 1| / 2;
* forgettability, mean |ΔA_k| after the trial update on the new documents (one SGD step of lr·10 on g,
  ∂L/∂g_k = c_k (2p - 1) / 2): P · 10·lr · |c_k| · |2p - 1| / 2;
* score = α·minmax(forgettability) + (1 - α)·minmax(sensitivity); the head_budget best heads are kept.

With c = [[1, -2], [3, 0.5]] and g = [[0.4, 0.1], [0.05, 0.2]]: |c·g| = [[.4, .2], [.15, .1]] -> minmax
[[1, 1/3], [1/6, 0]]; |c| = [[1, 2], [3, .5]] -> minmax [[.2, .6], [1, 0]]."""

import json
from types import SimpleNamespace

import pytest
import torch

from trainables.config import ReplayConfig, SeekrOptions
from trainables.encode import EncodedDoc
from trainables.replay import build_replay

V = 4
C = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
G = torch.tensor([[0.4, 0.1], [0.05, 0.2]])


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.g = torch.nn.Parameter(G.clone())

    def forward(self, input_ids, attention_mask, output_attentions=False):
        B, T = input_ids.shape
        attn = tuple(self.g[l].view(1, -1, 1, 1) * torch.ones(B, G.size(1), T, T) for l in range(G.size(0)))
        s = sum((C[l].view(1, -1, 1) * a.mean(-1)).sum(1) for l, a in enumerate(attn))  # [B, T]
        nxt = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1)
        nxt = (nxt + torch.arange(T) % 2) % V  # the true next token at even positions, a wrong one at odd ones
        logits = s.unsqueeze(-1) * torch.nn.functional.one_hot(nxt, V).float()
        return SimpleNamespace(logits=logits, attentions=attn if output_attentions else None)


class CharTokenizer:
    def __call__(self, text, return_offsets_mapping=True, add_special_tokens=True, truncation=True, max_length=64):
        text = text[:max_length]
        return {"input_ids": [1 + ord(ch) % (V - 1) for ch in text],
                "offset_mapping": [(i, i + 1) for i in range(len(text))]}


def _rank(tmp_path, alpha, budget, probe_batches=2, lr=0.01):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("abcab", "bcabc", "cabca", "aabbc")))
    model = Toy()
    run = SimpleNamespace(split=None, lama=None, tokenizer=CharTokenizer(), model=model, trainable={"g": model.g},
                          device=torch.device("cpu"), pad_id=0,
                          cfg=SimpleNamespace(train=SimpleNamespace(max_length=16, batch_size=2, lr=lr)),
                          docs=[EncodedDoc([1, 2, 3, 1, 2], [0] * 5), EncodedDoc([3, 2, 1, 3, 2], [0] * 5)])
    seekr = build_replay(ReplayConfig(kind="seekr", pool=str(pool), seekr=SeekrOptions(
        head_budget=budget, alpha=alpha, probe_batches=probe_batches)), seed=0)
    seekr.setup(run)
    assert torch.equal(model.g.detach(), G)  # the trial update is undone
    return seekr


def test_seekr_scores_and_heads_equal_the_hand_computed_values(tmp_path):
    s = float((C * G).sum())  # 0.45
    p = torch.exp(torch.tensor(s)).item() / (torch.exp(torch.tensor(s)).item() + V - 1)  # 0.3433
    half = abs(2 * p - 1) / 2  # |Σ_{b,t} ∂L/∂S| per batch: 0.1567
    seekr = _rank(tmp_path, alpha=0.5, budget=2, probe_batches=2, lr=0.01)
    sens = 2 * (C * G).abs() * half
    forget = 2 * 10 * 0.01 * C.abs() * half
    assert torch.tensor(seekr.scores["sensitivity"]) == pytest.approx(sens, rel=1e-5)
    assert torch.tensor(seekr.scores["forgettability"]) == pytest.approx(forget, rel=1e-4)
    expected = 0.5 * torch.tensor([[0.2, 0.6], [1.0, 0.0]]) + 0.5 * torch.tensor([[1.0, 1 / 3], [1 / 6, 0.0]])
    assert torch.tensor(seekr.scores["score"]) == pytest.approx(expected, abs=1e-5)  # [[.6, .467], [.583, 0]]
    assert seekr.heads == [(0, 0), (1, 0)]
    assert seekr.describe()["seekr_heads"] == [(0, 0), (1, 0)]


@pytest.mark.parametrize("alpha, budget, heads", [
    (0.9, 2, [(0, 1), (1, 0)]),  # .9·f + .1·s = [[.28, .573], [.917, 0]]
    (0.0, 2, [(0, 0), (0, 1)]),  # sensitivity alone: .4, .2 the largest |c·g|
    (1.0, 1, [(1, 0)]),  # forgettability alone: |c| = 3
    (0.5, 4, [(0, 0), (0, 1), (1, 0), (1, 1)]),  # the budget takes every head
])
def test_alpha_and_the_budget_choose_the_heads_by_hand(tmp_path, alpha, budget, heads):
    assert _rank(tmp_path, alpha=alpha, budget=budget).heads == heads
