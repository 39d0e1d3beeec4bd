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
        """The parameters of a group that share a step count (all of them, unless some had no gradient at some
        step) are updated together with foreach ops (a few kernels instead of ~10 per tensor): the same arithmetic
        as one tensor at a time, op for op. The step counts are CPU tensors (as torch's Adam keeps them): no
        device sync."""
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                st = self.state[p]
                if "exp_avg" not in st:
                    st["step"] = torch.zeros((), dtype=torch.float64)
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
            if not params:
                continue
            steps = [self.state[p]["step"] for p in params]
            torch._foreach_add_(steps, 1)
            by_step: dict[int, list] = {}
            for p, t in zip(params, torch.stack(steps).tolist()):
                by_step.setdefault(int(t), []).append(p)
            for t, ps in by_step.items():
                self._update(group, ps, t)
        return None

    def _update(self, group: dict, params: list, t: int) -> None:
        b1, b2 = group["betas"]
        lr, wd = group["lr"], group["weight_decay"]
        grads = [p.grad for p in params]
        exp_avg = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sq = [self.state[p]["exp_avg_sq"] for p in params]
        torch._foreach_mul_(exp_avg, b1)
        torch._foreach_add_(exp_avg, grads, alpha=1 - b1)
        torch._foreach_mul_(exp_avg_sq, b2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - b2)
        denom = torch._foreach_div(exp_avg_sq, 1 - b2 ** t)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, group["eps"])
        adam = torch._foreach_div(exp_avg, 1 - b1 ** t)
        torch._foreach_div_(adam, denom)
        lam = anneal_lambda(t, self.opts)
        # update = λ·adam + (1-λ)·γ·(θ - θ*)
        update = torch._foreach_mul(adam, lam)
        pull = torch._foreach_sub(params, [self.state[p]["pretrained"] for p in params])
        torch._foreach_mul_(pull, (1 - lam) * self.opts.pretrain_coef)
        torch._foreach_add_(update, pull)
        if wd:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_add_(params, update, alpha=-lr)


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
        """λ/2 Σ_i F_i (θ_i - θ*_i)² with foreach ops over the ~420 tensors of a LoRA θ and one sum over all of
        them (the gradient is op for op the per-tensor one's; the value's float32 summation order differs)."""
        lam = self.options.ewc.lam
        d = torch._foreach_sub(self.params, self.anchor)
        terms = torch._foreach_mul(torch._foreach_pow(d, 2), self.fisher)
        return 0.5 * lam * torch.cat([x.reshape(-1) for x in terms]).sum()

    def describe(self) -> dict:
        return {"ewc_fisher_pool": self.description,
                "ewc_fisher_sum": float(sum(f.sum() for f in self.fisher))}
