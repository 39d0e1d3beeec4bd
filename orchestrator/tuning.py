"""One Tuner builder for every study (`taalm ablate`'s grid and meta stage, `taalm tune`'s search, `taalm
resume`), so that they cannot drift apart: the trial's resources (CPUs, GPUs, memory: Ray's scheduler keeps
trials apart, not the OOM killer), the concurrency memory allows, retries (``FailureConfig(max_failures)``),
warm processes (``reuse_actors``), the study's callbacks, an optional searcher and scheduler, and restoring an
interrupted experiment.

:class:`StudyGuard` (a Tune callback) watches for faults no retry fixes, a write the disk refused (full,
read-only): it stops the experiment the way Ctrl-C does (Tune saves its state, trials keep their checkpoints)
and :func:`fit` raises :class:`~orchestrator.faults.StudyStopped`, which the CLI turns into a short message and
the `taalm resume` command.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Callable, Optional

from ray import tune

from .faults import StudyStopped, failure_reason, install, request_stop, storage_fault
from .ray_trainables import trial_resources
from .specs import Resources
from .storage import Storage

_CURRENT: dict = {}  # the guard of the Tuner being built (a restored experiment's pickled guard becomes it)


def _current_guard() -> "StudyGuard":
    return _CURRENT.get("guard") or StudyGuard()


class StudyGuard(tune.Callback):
    """Which trials ended (completed or failed for good), and whether a refused write should stop the study."""

    def __init__(self):
        self.ended: set[str] = set()
        self.stop_reason: Optional[str] = None
        self.unfinished: list[str] = []

    def __reduce__(self):  # Tune pickles its callbacks with the experiment: a restored one is this process's
        return (_current_guard, ())

    def _check(self, trial) -> None:
        reason = failure_reason(trial)
        if self.stop_reason is None and storage_fault(reason):
            self.stop_reason = reason
            request_stop(reason)
            self._stop()

    def _stop(self) -> None:
        """Tune's own graceful stop (SIGUSR1, as SIGINT: the loop ends after this step, the experiment's state is
        saved, running trials keep their last checkpoint and resume from it)."""
        handler = signal.getsignal(signal.SIGUSR1)
        if threading.current_thread() is threading.main_thread() and \
                getattr(handler, "__name__", "") == "signal_interrupt_tune_run":
            os.kill(os.getpid(), signal.SIGUSR1)
        else:  # Tune runs outside the main thread: it cannot be signalled, stop it by raising
            raise StudyStopped(self.stop_reason)

    def on_step_end(self, iteration, trials, **info):
        # trials a restored experiment had already ended (no event for them in this run); during the loop a trial
        # reaches these states only through the events below (a retried trial goes back to PENDING at once)
        for t in trials:
            if t.status in ("TERMINATED", "ERROR"):
                self.ended.add(t.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ended.add(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.ended.add(trial.trial_id)
        self._check(trial)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._check(trial)

    def on_experiment_end(self, trials, **info):
        # Tune's clean-up marks a trial it stopped TERMINATED: a trial that really ended has its last result `done`
        # (or is ERROR), whether it ended in this run or before a restore
        self.unfinished = [t.trial_id for t in trials if t.trial_id not in self.ended and t.status != "ERROR"
                           and not (t.last_result or {}).get("done")]


def build_tuner(trainable, *, name: str, study_dir: Path, resources: Resources, callbacks: list,
                kind: str = "continual", param_space: Optional[dict] = None, search_alg=None, scheduler=None,
                num_samples: int = 1, dirname: Optional[Callable] = None,
                resume: bool = False, storage: Optional[Storage] = None) -> tuple[tune.Tuner, StudyGuard]:
    """The Tuner of a study stage. ``resources`` are the stage's effective resources (``max_concurrent`` already
    capped to what memory holds, ``memory_gb`` what each trial worker reserves); with ``resume``, the stage's saved
    experiment is restored when there is one: finished trials are kept, unfinished and errored ones continue from
    their latest checkpoint."""
    install()
    guard = StudyGuard()
    _CURRENT["guard"] = guard
    request_stop(None)
    trainable = tune.with_resources(trainable, trial_resources(resources, kind))
    # Tune's experiment state and the trials' checkpoints: the study's storage (every node reaches it), else the
    # study directory
    storage = storage or Storage.resolve(None, Path(study_dir))
    path = storage.join("tune", name)
    if resume and tune.Tuner.can_restore(path):
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True,
                                  param_space=param_space), guard
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            search_alg=search_alg, scheduler=scheduler, num_samples=num_samples,
            max_concurrent_trials=resources.max_concurrent,
            # a finished trial's process takes the next trial: no new process, no re-import, the base weights
            # already loaded (lean trials)
            reuse_actors=True, trial_dirname_creator=dirname),
        run_config=tune.RunConfig(name=name, storage_path=storage.join("tune"), callbacks=[guard] + list(callbacks),
                                  failure_config=tune.FailureConfig(max_failures=resources.max_failures),
                                  verbose=0),
    )
    return tuner, guard


def fit(tuner: tune.Tuner, guard: StudyGuard, study_dir: Path):
    """Run the stage; a stage that stopped before its trials ended (a refused write, Ctrl-C) raises
    :class:`StudyStopped` (its state is saved: `taalm resume`)."""
    results = tuner.fit()
    if guard.stop_reason is not None or guard.unfinished:
        raise StudyStopped(guard.stop_reason or "interrupted", Path(study_dir), len(guard.unfinished))
    return results
