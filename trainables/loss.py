"""Token-weighted causal-LM loss (ALGORITHM.md §1)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

EPS = 1e-6


def prediction_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T-1] float mask of predicted positions: position t predicts x_{t+1}; both must be real."""
    m = attention_mask.to(torch.float32)
    return m[:, :-1] * m[:, 1:]


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """l_t = -log p(x_{t+1} | x_{<=t}) for t = 0..T-2, as a [B, T-1] tensor, 0 on padding."""
    logits = logits[:, :-1, :]
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()  # half-precision logits: the loss is computed in float32
    targets = input_ids[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    nll = nll.view(targets.shape)
    return nll * prediction_mask(attention_mask).to(nll.dtype)


def weighted_loss(nll: torch.Tensor, weights: torch.Tensor, normaliser: Optional[torch.Tensor] = None) -> torch.Tensor:
    """L_w = mean over sequences of  Σ_t w_t l_t / (Σ_t w_t + 1e-6).

    ``weights`` must already be 0 on padded positions (schemes multiply by the prediction mask).
    ``normaliser``: [B] denominators stated by a scheme instead of Σ_t w_t + 1e-6 (the release-style RHO-1's
    k · real tokens, ``Scheme.normaliser``); None for every other scheme.
    """
    weights = weights.to(nll.dtype)
    if normaliser is None:
        per_seq = (weights * nll).sum(dim=1) / (weights.sum(dim=1) + EPS)
    else:
        per_seq = (weights * nll).sum(dim=1) / normaliser.to(nll.dtype)
    return per_seq.mean()
