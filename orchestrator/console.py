"""What a user sees while a study runs.

:class:`StudyConsole` is a Tune callback that knows the study's trials before they start (so counts are out
of the study's total, not out of what Tune has created so far). On a terminal it draws one live table
(rich): every trial's state, epoch, current TO-LEARN / NOT-TO-FORGET accuracy and time, with the study's
elapsed and estimated remaining time; elsewhere (CI, a pipe) it prints one plain line per epoch and per
finished or failed trial. Failed trials stay visible with their reason.

It implements the study's progress protocol (orchestrator/progress.py); what Ray, Tune and MLflow print
themselves is set up apart from it (orchestrator/logs.py), below the study.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

from ray import tune
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from trainables.loop import UNIT

from .faults import failure_reason, retry_line, stopping
from .progress import Progress


# one line per report, by the loop's report kind (trainables/loop.py)
REPORT_LINE = {
    "epoch": lambda r: f"TO-LEARN {r.get('to_learn_acc', float('nan')):.3f}  NTF {r.get('ntf_acc', float('nan')):.3f}",
    "check": lambda r: (f"validation acc {r.get('val_acc', float('nan')):.3f}, weight on object tokens "
                        f"{r.get('object_weight_share', float('nan')):.1%}"),
    "period": lambda r: (f"{r.get('label', '')} CHANGED ppl {r.get('changed_ppl', float('nan')):.2f}  "
                         f"UNCHANGED ppl {r.get('unchanged_ppl', float('nan')):.2f}").strip(),
}


def _fmt_time(s: Optional[float]) -> str:
    if s is None or s != s:
        return "–"
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


@dataclass
class TrialView:
    name: str  # "TAALM seed 0"
    total_epochs: Optional[int]  # the last index of its reports (epochs, meta-steps, periods - 1); None: unknown
    state: str = "pending"
    epoch: Optional[int] = None  # the index of its latest report
    unit: str = "epoch"  # what the index counts (trainables/loop.py UNIT)
    to_learn: Optional[float] = None
    ntf: Optional[float] = None
    started: Optional[float] = None
    first_result: Optional[float] = None
    first_index: int = 0  # the index of the first report this process saw
    ended: Optional[float] = None
    reason: str = ""
    extra: dict = field(default_factory=dict)
    before: bool = False  # finished before this process started (a resumed study): counted, not timed

    def position(self) -> str:
        """"epoch 2/3", "step 40/88", "period 1/2" (periods counted from 1)."""
        if self.epoch is None:
            return ""
        shown, total = self.epoch, self.total_epochs
        if self.unit == "period":
            shown, total = shown + 1, None if total is None else total + 1
        return f"{self.unit} {shown}" + (f"/{total}" if total is not None else "")

    def elapsed(self, now: float) -> Optional[float]:
        return None if self.started is None else (self.ended or now) - self.started

    def expected_duration(self, now: float) -> Optional[float]:
        """A running trial's whole duration in this process, extrapolated from its epochs so far in this process (a
        resumed trial's earlier epochs ran before: they are neither timed nor left to do)."""
        if self.ended is not None:
            return None if self.started is None else self.ended - self.started
        if self.started is None or self.first_result is None or self.epoch is None or not self.total_epochs:
            return None
        done = self.epoch - self.first_index
        if done <= 0:
            return None
        per_epoch = (now - self.first_result) / done
        return (now - self.started) + per_epoch * max(0, self.total_epochs - self.epoch)


_ACTIVE: dict = {}  # the console of this process's study (the CLI's), what a restored experiment's console becomes


def _restored_console(name: str):
    """What Tune's pickled console becomes when `taalm resume` restores the experiment: this process's console
    (its clock starts at the resume), or a callback that does nothing when none is showing."""
    return _ACTIVE.get("console") or tune.Callback()


class StudyConsole(tune.Callback, Progress):
    """A Tune callback drawing the study's progress (see the module docstring)."""

    def __init__(self, name: str = "study", interactive: Optional[bool] = None, console: Optional[Console] = None):
        self.console = console or Console(stderr=True)
        self.interactive = self.console.is_terminal if interactive is None else interactive
        self.name = name
        self.views: dict[str, TrialView] = {}
        self.stage = ""
        self.concurrency = 1
        self.total: Optional[int] = None  # trials of this stage (a search knows the number, not the trials)
        self.t0 = time.monotonic()  # elapsed and remaining time count from here: this process (a resume's own)
        self.live: Optional[Live] = None
        self.before = 0  # trials of this stage done before this process (a resumed study)

    # -- what the study tells us before Tune starts ---------------------------------------------------------

    def activate(self) -> "StudyConsole":
        """This is the process's console: a restored experiment's pickled console becomes it."""
        _ACTIVE["console"] = self
        return self

    def __reduce__(self):  # Tune pickles its callbacks with the experiment state: the view is not state
        return (_restored_console, (self.name,))

    def expect(self, stage: str, trials: list[tuple[str, str, Optional[int]]], concurrency: int,
               done_before: Optional[set] = None, total: Optional[int] = None) -> None:
        """The next Tune run's trials: (trial key, display name, epochs or None); ``done_before``: the keys of
        those a resumed study had finished already (counted, not timed); ``total``: how many trials a stage whose
        trials are not known in advance (a search) will have."""
        self.stage, self.concurrency, self.total = stage, max(1, concurrency), len(trials) or total
        done_before = done_before or set()
        for key, name, epochs in trials:
            v = self.views.setdefault(key, TrialView(name, epochs))
            if key in done_before:
                v.state, v.before = "done", True
        self._stage_keys = [k for k, _, _ in trials]
        self.before = sum(k in done_before for k in self._stage_keys)
        if not self.interactive and trials:
            self.console.print(f"{self.name}: {stage}: {len(trials)} trial(s), {self.concurrency} at a time"
                               + (f", {self.before} done before this resume" if self.before else ""),
                               highlight=False, soft_wrap=True)
        self._refresh()

    def note(self, text: str) -> None:
        """A line of the study's own (which Ray it runs on, caches built once before the trials, the memory plan):
        above the live table, or one line in a pipe."""
        line = f"{self.name}: {text}"
        if self.live is not None:
            self.live.console.print(line, highlight=False, soft_wrap=True)
        else:
            self.console.print(line, highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
        if _ACTIVE.get("console") is self:
            _ACTIVE.pop("console")

    # -- Tune's events ------------------------------------------------------------------------------------

    def _view(self, trial) -> TrialView:
        t = trial.config.get("t") if isinstance(trial.config, dict) else None
        key = t["trial_key"] if t else trial.trial_id
        if key not in self.views:  # a search trial: known once Tune samples it
            sampled = ", ".join(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                                for k, v in sorted(trial.config.items()))
            self.views[key] = TrialView(f"{trial.trial_id}: {sampled}", None)
            self._stage_keys = list(dict.fromkeys(getattr(self, "_stage_keys", []) + [key]))
        return self.views[key]

    def on_trial_start(self, iteration, trials, trial, **info):
        v = self._view(trial)
        v.state, v.started, v.ended, v.reason = "running", v.started or time.monotonic(), None, ""
        self._refresh()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        """A loop's report (trainables/loop.py): ``kind`` says which loop, ``index`` / ``total`` where it is."""
        v = self._view(trial)
        now = time.monotonic()
        v.state = "running"
        v.started = v.started or now
        kind = result.get("kind")
        if kind not in REPORT_LINE:
            return
        if v.first_result is None:
            v.first_result, v.first_index = now, int(result.get("index", 0))
        v.unit, v.epoch = UNIT[kind], int(result.get("index", 0))
        total = result.get("total")
        if isinstance(total, (int, float)) and total == total:
            v.total_epochs = int(total)
        if kind == "epoch":
            v.to_learn, v.ntf = result.get("to_learn_acc"), result.get("ntf_acc")
        else:
            v.extra["line"] = REPORT_LINE[kind](result)
        if not self.interactive:
            self.console.print(f"  {v.name} {v.position()}: {REPORT_LINE[kind](result)}", highlight=False,
                               soft_wrap=True)
        self._refresh()

    def on_trial_complete(self, iteration, trials, trial, **info):
        v = self._view(trial)
        v.state, v.ended = "done", time.monotonic()
        if not self.interactive:
            self.console.print(f"trial done: {v.name} ({self._progress_text()})", highlight=False, soft_wrap=True)
        self._refresh()

    def on_trial_error(self, iteration, trials, trial, **info):
        v = self._view(trial)
        v.state, v.ended, v.reason = "FAILED", time.monotonic(), failure_reason(trial)
        msg = f"trial FAILED: {v.name}: {v.reason} ({self._progress_text()})"
        if self.live is not None:
            self.live.console.print(Text(msg, style="bold red"))
        else:
            self.console.print(Text(msg, style="bold red"), soft_wrap=True)
        self._refresh()

    def on_trial_recover(self, iteration, trials, trial, **info):
        v = self._view(trial)
        # a refused write stops the study instead (orchestrator/tuning.py): the trial continues at `taalm resume`
        what = "stopped" if stopping() else "retrying"
        v.state, v.reason = what, retry_line(trial, failure_reason(trial))
        line = f"trial {'stopped' if what == 'stopped' else 'retried'}: {v.name}: {v.reason}"
        if not self.interactive:
            self.console.print(line, highlight=False, soft_wrap=True)
        else:
            target = self.live.console if self.live is not None else self.console
            target.print(Text(line, style="yellow"), soft_wrap=True)
        self._refresh()

    def on_experiment_end(self, trials, **info):
        self._refresh()

    # -- rendering ----------------------------------------------------------------------------------------

    def _stage_views(self) -> list[TrialView]:
        return [self.views[k] for k in getattr(self, "_stage_keys", []) if k in self.views]

    def remaining(self) -> Optional[float]:
        """Seconds left in this stage: the running trials' extrapolated rest plus the pending trials at the
        mean (expected) trial duration, spread over the concurrency."""
        now = time.monotonic()
        views = self._stage_views()
        known = [d for d in (v.expected_duration(now) for v in views if v.state in ("done", "running")) if d]
        if not known:
            return None
        mean = sum(known) / len(known)
        work = mean * max(0, (self.total or 0) - len(views))  # not sampled yet (searches)
        for v in views:
            if v.state in ("running", "retrying"):
                d = v.expected_duration(now) or mean
                work += max(0.0, d - (v.elapsed(now) or 0.0))
            elif v.state == "pending":
                work += mean
        return work / self.concurrency

    def _progress_text(self) -> str:
        views = self._stage_views()
        done = sum(v.state == "done" for v in views)
        failed = sum(v.state == "FAILED" for v in views)
        left = self.remaining()
        n = max(len(views), self.total or 0)
        before = sum(v.before for v in views)
        return (f"{done}/{n} done" + (f" ({before} before this resume)" if before else "")
                + (f", {failed} failed" if failed else "")
                + f", {_fmt_time(time.monotonic() - self.t0)} elapsed"
                + (f", ~{_fmt_time(left)} left" if left is not None and done + failed < n else ""))

    def _table(self) -> Group:
        now = time.monotonic()
        views = self._stage_views()
        running = sum(v.state == "running" for v in views)
        header = Text.assemble((self.name, "bold"), f" · {self.stage} · {self._progress_text()}, {running} running")
        t = Table(expand=False)
        for col in ("trial", "state", "progress", "TO-LEARN", "NTF", "time"):
            t.add_column(col, justify="right" if col in ("progress", "TO-LEARN", "NTF", "time") else "left")
        style = {"done": "green", "running": "cyan", "FAILED": "bold red", "retrying": "yellow", "pending": "dim",
                 "stopped": "yellow"}
        for v in views:
            acc = lambda x: "" if x is None or x != x else f"{x:.3f}"  # noqa: E731
            state = v.state + (f": {v.reason[:60]}" if v.reason else "")
            t.add_row(v.name, Text(state, style=style.get(v.state, "")), v.position(), acc(v.to_learn), acc(v.ntf),
                      _fmt_time(v.elapsed(now)))
            if v.extra.get("line"):  # meta-training's latest check, TemporalWiki's latest period
                t.add_row("", Text(v.extra["line"], style="dim"), "", "", "", "")
        return Group(header, t)

    def _refresh(self) -> None:
        if not self.interactive:
            return
        if self.live is None:
            self.live = Live(self._table(), console=self.console, refresh_per_second=1, transient=False,
                             get_renderable=self._table)
            self.live.start()
        else:
            self.live.update(self._table())

