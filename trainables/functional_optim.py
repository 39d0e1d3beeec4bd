"""Inner-loop optimizers written functionally, so an update can be part of the autograd graph.

``step(params, grads, state) -> (new_params, new_state)`` never modifies its inputs in place. Called
on tensors that carry a graph (grads from ``autograd.grad(..., create_graph=True)``), the new
parameters are differentiable functions of whatever the gradients depend on (Train-Attention's
weights). Called on detached tensors it is an ordinary (first-order) update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .registry import INNER_OPTIMIZERS

Params = dict[str, torch.Tensor]


class FunctionalOptimizer(Protocol):
    def init(self, params: Params) -> dict: ...

    def step(self, params: Params, grads: Params, state: dict) -> tuple[Params, dict]: ...


@INNER_OPTIMIZERS.register("sgd")
@dataclass
class SGD:
    lr: float
    weight_decay: float = 0.0

    def init(self, params: Params) -> dict:
        return {}

    def step(self, params, grads, state):
        new = {}
        for k, p in params.items():
            g = grads[k]
            if self.weight_decay:
                g = g + self.weight_decay * p
            new[k] = p - self.lr * g
        return new, state


@INNER_OPTIMIZERS.register("adam")
@dataclass
class Adam:
    """Adam (``decoupled=False``: L2 added to the gradient) or AdamW (decoupled weight decay), as
    in torch.optim. The square root is taken of v̂ + 1e-30 so its derivative stays finite where a
    gradient is exactly zero (e.g. LoRA's A matrices while B = 0); the update is unchanged."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled: bool = False

    def init(self, params: Params) -> dict:
        return {"t": 0, "m": {k: torch.zeros_like(p) for k, p in params.items()},
                "v": {k: torch.zeros_like(p) for k, p in params.items()}}

    def step(self, params, grads, state):
        b1, b2 = self.betas
        t = state["t"] + 1
        m, v, new = {}, {}, {}
        for k, p in params.items():
            g = grads[k]
            if self.weight_decay and not self.decoupled:
                g = g + self.weight_decay * p
            m[k] = b1 * state["m"][k] + (1 - b1) * g
            v[k] = b2 * state["v"][k] + (1 - b2) * g * g
            m_hat = m[k] / (1 - b1 ** t)
            v_hat = v[k] / (1 - b2 ** t)
            upd = m_hat / (torch.sqrt(v_hat + 1e-30) + self.eps)
            base = p * (1 - self.lr * self.weight_decay) if (self.weight_decay and self.decoupled) else p
            new[k] = base - self.lr * upd
        return new, {"t": t, "m": m, "v": v}


@INNER_OPTIMIZERS.register("adamw")
@dataclass
class AdamW(Adam):
    weight_decay: float = 0.01
    decoupled: bool = True


def detach_state(state: dict) -> dict:
    """A copy of an optimizer state with every tensor cut from the graph."""
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out[k] = detach_state(v)
        elif torch.is_tensor(v):
            out[k] = v.detach()
        else:
            out[k] = v
    return out
