"""LAMA-CKL probe metrics (ALGORITHM.md §3, protocol step 4) and the curve summary (step 5).

Object tokens are located by character offsets: the tokens whose character span overlaps the LAST
occurrence of the object string in the probe sentence. With BPE/SentencePiece tokenizers that is the
object as it appears inside the sentence (e.g. " Chile" with its leading space).

Prediction is teacher-forced and greedy: the token at position p is predicted from the logits at p-1.
A token counts as correct only when its logit is strictly the largest: a tie with another token is
not a correct prediction (the release's code could mis-align on ties; here ties are explicit).

Evaluation runs in fp32 whatever the training precision (autocast off around the forward): bf16 logits are 0.125
apart near 16-32, so under bf16 ties and swapped top-two logits would change which facts count as known (epoch 0
below 1.0 on NOT-TO-FORGET, tables not comparable with fp32 runs; bench/eval_precision.py measures it). Upcasting
only the logits does not help: the ties come from the bf16 matmuls before the head.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import InputError


@dataclass(frozen=True)
class EncodedProbe:
    input_ids: list[int]
    positions: list[int]  # token positions of the object (all >= 1)


def object_token_positions(offsets: Sequence[tuple[int, int]], start: int, end: int) -> list[int]:
    """Indices of tokens whose (non-empty) character span overlaps [start, end)."""
    return [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]


def encode_probe(tokenizer, text: str, obj: str, where: str = "") -> EncodedProbe:
    start = text.rfind(obj)
    if not obj or start < 0:
        raise InputError(where, f"object {obj!r} does not occur in probe {text!r}")
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    positions = [p for p in object_token_positions(enc["offset_mapping"], start, start + len(obj)) if p >= 1]
    if not positions:
        raise InputError(where, f"object {obj!r} has no predictable token in probe {text!r}")
    return EncodedProbe(list(enc["input_ids"]), positions)


def strict_argmax_correct(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[N, V] logits, [N] targets -> [N] bool: target logit strictly above every other logit."""
    top2 = logits.topk(2, dim=-1)
    return (top2.indices[:, 0] == targets) & (top2.values[:, 0] > top2.values[:, 1])


@torch.no_grad()
def probe_scores(model, probes: Sequence[EncodedProbe], pad_id: int, batch_size: int = 32,
                 device: torch.device | str = "cpu", fp32_forward: bool = True) -> list[tuple[float, float]]:
    """(token accuracy, exact match) per probe. Only the logits at the object positions leave the model's device
    (a batch's full [B, T, vocabulary] logits never do), and they are judged there. ``fp32_forward``: autocast off
    (the module docstring); False runs under the caller's autocast (bench/eval_precision.py compares)."""
    was_training = model.training
    model.eval()
    out: list[tuple[float, float]] = []
    try:
        for i in range(0, len(probes), batch_size):
            chunk = probes[i:i + batch_size]
            width = max(len(p.input_ids) for p in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            rows, cols, sizes = [], [], []
            for b, p in enumerate(chunk):
                ids[b, :len(p.input_ids)] = torch.tensor(p.input_ids)
                mask[b, :len(p.input_ids)] = 1
                rows += [b] * len(p.positions)
                cols += p.positions
                sizes.append(len(p.positions))
            ids, mask = ids.to(device), mask.to(device)
            fp32 = torch.autocast(device_type=ids.device.type, enabled=False) if fp32_forward else nullcontext()
            with fp32:
                logits = model(input_ids=ids, attention_mask=mask).logits
            r, c = torch.tensor(rows, device=ids.device), torch.tensor(cols, device=ids.device)
            correct = strict_argmax_correct(logits[r, c - 1].float(), ids[r, c]).cpu()
            for part in correct.split(sizes):
                out.append((part.float().mean().item(), float(bool(part.all()))))
    finally:
        model.train(was_training)
    return out


def mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


def summarize(to_learn_acc: Sequence[float], ntf_acc: Sequence[float]) -> dict:
    """Top Acc = max TO-LEARN accuracy over the training epochs (1..N; epoch 0, before training, only
    when no epoch was trained); Epoch = the first epoch reaching it; NF Acc = NOT-TO-FORGET accuracy at
    that epoch; Total Knowledge = Top Acc + NF Acc."""
    if not to_learn_acc:
        raise ValueError("empty learning curve")
    first = 1 if len(to_learn_acc) > 1 else 0
    top = max(to_learn_acc[first:])
    epoch = next(i for i in range(first, len(to_learn_acc)) if to_learn_acc[i] == top)
    nf = ntf_acc[epoch] if epoch < len(ntf_acc) else float("nan")
    return {"top_acc": top, "top_epoch": epoch, "nf_acc": nf, "total_knowledge": top + nf}
