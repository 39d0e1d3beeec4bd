"""Every random seed of a run, derived in one place from the run's seed (``seed``) or the data seed.

Each random stream has its own generator seeded here, so streams never disturb each other (adding a
replay method does not change the batch order). The formulas are the ones the measured results in
docs/RESULTS.md were produced with; changing one changes those numbers.
"""

from __future__ import annotations

import random


def seed_everything(seed: int) -> None:
    """The global generators (adapter initialisation, dropout)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def batch_order(seed: int, epoch: int) -> int:
    """The permutation of the training documents in one epoch."""
    return seed * 7919 + epoch


def period_batch_order(seed: int, period: int, epoch: int) -> int:
    """The permutation of a TemporalWiki period's documents in one of its epochs."""
    return seed * 7919 + period * 1000 + epoch


def period_round(period: int, epoch: int) -> int:
    """The replay round of a TemporalWiki period's epoch (``replay_sample``'s ``epoch``): every epoch of every
    period draws its own replayed documents (the first epoch of period i keeps round i)."""
    return period + 1000 * epoch


def step(seed: int, epoch: int, step: int) -> int:
    """A training step's generator (the random weighting scheme)."""
    return seed * 1_000_003 + epoch * 100_003 + step


def period_step(seed: int, period: int, epoch: int, step: int) -> int:
    """A TemporalWiki training step's generator."""
    return seed * 1_000_003 + period * 100_003 + epoch * 1009 + step


def replay_sample(seed: int, epoch: int, step: int) -> int:
    """Which replayed documents join a batch."""
    return seed * 1_000_003 + epoch * 10_007 + step


def replay_pool(seed: int) -> int:
    """The subsample of the replay pool (``replay.size``)."""
    return seed + 5


def ewc_fisher(seed: int) -> int:
    """The general-text batches EWC estimates the Fisher information on."""
    return seed + 29


def seekr_probe(seed: int) -> int:
    """The replay batches SEEKR ranks its attention heads on."""
    return seed + 17


def split_sample(data_seed: int, which: int) -> int:
    """The subsample of a split's set: which = 1 TO-LEARN, 2 NOT-TO-FORGET, 3 Train-Attention pool."""
    return data_seed * 1000 + which


def temporalwiki_subsample(seed: int, period: int, which: str) -> int:
    """The subsample of a TemporalWiki period's diff set or probe set."""
    return seed + {"diff": 0, "changed": 100, "unchanged": 200}[which] + period


def phi_init(seed: int) -> int:
    """φ's head and adapters at the start of meta-training."""
    return seed + 1


def meta_pool(seed: int) -> int:
    """The held-out/training cut of the Train-Attention pool, its subsample, and the meta-batch order (with the
    unrelated probes of ``meta.restrict_unrelated``, one stream)."""
    return seed
