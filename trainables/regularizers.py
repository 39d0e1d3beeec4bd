"""Regularisers of θ's update (the regulariser axis).

A regulariser is a :class:`Regularizer` registered under a name: it supplies the optimizer
(``optimizer(params)``; default: ``train.optimizer``) and may add a loss term (``extra_loss``). Registered:
``none``, ``recadam`` and ``ewc``.

RecAdam (Chen et al. 2020): Adam whose step is annealed from a quadratic pull towards the pre-trained
weights θ* to the task update:

    θ ← θ - lr · [ λ(t) · adam_step(g)  +  (1 - λ(t)) · γ · (θ - θ*) ]

with λ(t) = sigmoid(k · (t - t0)) (the release: k 0.5, t0 250, γ "pretrain coefficient" 5000), or a
linear ramp min(1, t / t0), or constant 1 (plain Adam). θ* is the trainable parameters at start (for
LoRA: the initial adapter, i.e. the pre-trained function).
"""

from __future__ import annotations

import math
import random

import torch

from . import seeds
from .component import Component
from .config import RecAdamOptions, RegularizerConfig, TrainConfig
from .registry import REGULARIZERS


class Regularizer(Component):
    """No regularisation: the optimizer of ``train.optimizer``."""

    def __init__(self, options: RegularizerConfig, train: TrainConfig):
        self.options, self.train = options, train

    def optimizer(self, params) -> torch.optim.Optimizer:
        t = self.train
        if t.optimizer == "sgd":
            return torch.optim.SGD(params, lr=t.lr, weight_decay=t.weight_decay)
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


REGULARIZERS.register("none")(Regularizer)


def build_regularizer(options: RegularizerConfig, train: TrainConfig) -> Regularizer:
    return REGULARIZERS.get(options.kind, "regularizer.kind")(options, train)


def anneal_lambda(step: int, opts: RecAdamOptions) -> float:
    if opts.anneal == "sigmoid":
        return 1.0 / (1.0 + math.exp(-opts.k * (step - opts.t0)))
    if opts.anneal == "linear":
        return min(1.0, step / opts.t0)
    return 1.0


class RecAdam(torch.optim.Optimizer):
    def __init__(self, params, lr: float, opts: RecAdamOptions, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        params = list(params)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.opts = opts
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["pretrained"] = p.detach().clone()

    def penalty(self) -> float:
        """(γ/2) Σ (θ - θ*)², the quadratic term the annealed step descends."""
        total = 0.0
        for group in self.param_groups:
            for p in group["params"]:
                total += float(((p.detach() - self.state[p]["pretrained"]) ** 2).sum())
        return 0.5 * self.opts.pretrain_coef * total

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if "exp_avg" not in st:
                    st["step"] = torch.zeros((), dtype=torch.float64)
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                st["step"] += 1
                t = int(st["step"].item())
                g = p.grad
                st["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (st["exp_avg_sq"] / (1 - b2 ** t)).sqrt_().add_(group["eps"])
                adam = (st["exp_avg"] / (1 - b1 ** t)) / denom
                lam = anneal_lambda(t, self.opts)
                update = lam * adam + (1 - lam) * self.opts.pretrain_coef * (p - st["pretrained"])
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"])
        return None


@REGULARIZERS.register("recadam")
class RecAdamRegularizer(Regularizer):
    def optimizer(self, params):
        return RecAdam(params, lr=self.train.lr, opts=self.options.recadam, weight_decay=self.train.weight_decay)


@REGULARIZERS.register("ewc")
class EWC(Regularizer):
    """Elastic weight consolidation (Kirkpatrick et al. 2017): a quadratic pull of each trainable parameter
    towards its value before training, θ*, weighted by how much the pre-trained model's predictions on
    general text depend on it (the diagonal Fisher information F):

        extra loss = λ/2 · Σ_i F_i (θ_i - θ*_i)²

    F is estimated once in ``setup`` as the mean squared gradient of the plain LM loss over
    ``regularizer.ewc.batches`` batches of the ``regularizer.ewc.pool`` documents (the empirical Fisher, per
    batch rather than per example, to keep it one backward per batch)."""

    def setup(self, run) -> None:
        from .encode import collate, encode_document
        from .loss import prediction_mask, token_nll, weighted_loss
        from .replay import load_pool_texts

        o = self.options.ewc
        texts, self.description = load_pool_texts(o.pool, run.split, run.lama, key="regularizer.ewc.pool")
        docs = [encode_document(run.tokenizer, t, "", run.cfg.train.max_length) for t in texts if t.strip()]
        rng = random.Random(seeds.ewc_fisher(run.cfg.seed))
        n = run.cfg.train.batch_size
        params = list(run.trainable.values())
        self.anchor = [p.detach().clone() for p in params]
        self.fisher = [torch.zeros_like(p) for p in params]
        was = run.model.training
        run.model.eval()  # no dropout: F is a property of the pre-trained model
        for _ in range(o.batches):
            b = collate(rng.sample(docs, min(n, len(docs))), run.pad_id)
            b = {k: v.to(run.device) for k, v in b.items()}
            out = run.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            loss = weighted_loss(token_nll(out.logits, b["input_ids"], b["attention_mask"]),
                                 prediction_mask(b["attention_mask"]))
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for f, g in zip(self.fisher, grads):
                if g is not None:
                    f.add_(g.detach() ** 2 / o.batches)
        run.model.train(was)
        self.params = params

    def extra_loss(self, run, out, batch):
        lam = self.options.ewc.lam
        return 0.5 * lam * sum((f * (p - a) ** 2).sum() for f, p, a in zip(self.fisher, self.params, self.anchor))

    def describe(self) -> dict:
        return {"ewc_fisher_pool": self.description,
                "ewc_fisher_sum": float(sum(f.sum() for f in self.fisher))}
