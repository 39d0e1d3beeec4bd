"""Progress lines while a study runs (a Tune callback; module level so Tune can pickle it)."""

from __future__ import annotations

from ray import tune


def _console():
    from rich.console import Console

    return Console(stderr=True)


class TuneProgress(tune.Callback):
    def on_trial_result(self, iteration, trials, trial, result, **info):
        t = trial.config.get("t", {"trial_key": trial.trial_id, "config": {"seed": "-"}})
        if "epoch" in result:
            _console().print(f"  {t.get('label', t['trial_key'])} (seed {t['config'].get('seed', '-')}) epoch {result['epoch']}: "
                             f"TO-LEARN {result['to_learn_acc']:.3f}  NTF {result['ntf_acc']:.3f}", highlight=False)
        elif "val_acc" in result:
            _console().print(f"  meta-training step {result['step']}: validation acc {result['val_acc']:.3f}",
                             highlight=False)

    def on_trial_complete(self, iteration, trials, trial, **info):
        done = sum(t.status == "TERMINATED" for t in trials) + 1
        t = trial.config.get("t", {"trial_key": trial.trial_id})
        _console().print(f"trial done: {t.get('label', t['trial_key'])} "
                         f"({min(done, len(trials))}/{len(trials)})", highlight=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        _console().print(f"trial FAILED: {trial.trial_id}", highlight=False)
