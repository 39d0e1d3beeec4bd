"""The small interface every axis implementation shares (parameterisation, weighting scheme, regulariser,
replay method): a class built from its config block, registered under a name (``trainables.registry``),
with a few hooks the loops call. Each hook has a do-nothing default, so an implementation overrides only
what it needs, and the loops never name a method (Avalanche's plugin idea, cut down to the hooks used).

    setup(run)                    once, after θ, the data and every component exist (SEEKR ranks heads here)
    extra_loss(run, out, batch)   a term added to the batch loss (GeRe, SEEKR; an EWC penalty would go here)
    describe()                    what the run's metrics.json records about this component

Axis-specific hooks live on each axis's base class: ``Parameterisation.apply``, ``Scheme.__call__``,
``Regularizer.optimizer``, ``Replay.sample``.
"""

from __future__ import annotations

from typing import Any, Optional


class Component:
    # the loop must build the frozen initial θ (``RunSetup.reference_model``) for this component
    needs_reference_model = False

    def setup(self, run: Any) -> None:
        """Called once before training, with the run's :class:`~trainables.continual.RunSetup`."""

    def extra_loss(self, run: Any, out: Any, batch: dict) -> Optional[Any]:
        """A tensor added to the batch loss, or None. ``out`` is θ's forward output on ``batch``
        (``batch["replay_rows"]`` marks the replayed documents)."""
        return None

    def describe(self) -> dict:
        return {}
