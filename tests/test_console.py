"""The study console (orchestrator/console.py) driven with Tune's callback events, no Ray needed: counts out of
the study's total, epoch lines, failures with their reason, the live table on a terminal. (The concurrency
test checks a real `taalm ablate`'s piped console: tests/test_concurrency.py.)"""

from __future__ import annotations

import io
import logging
from types import SimpleNamespace

from rich.console import Console

from orchestrator.console import StudyConsole
from orchestrator.logs import configure_output


def _trial(key: str, error_file=None):
    return SimpleNamespace(trial_id=f"id_{key}", config={"t": {"trial_key": key}}, error_file=error_file)


def _console(interactive: bool):
    buf = io.StringIO()
    con = Console(file=buf, force_terminal=interactive, width=120, color_system=None)
    return StudyConsole("g", interactive=interactive, console=con), buf


def _epoch(c, trial, epoch, tl, ntf):
    c.on_trial_result(0, [], trial, {"kind": "epoch", "index": epoch, "total": 2, "to_learn_acc": tl, "ntf_acc": ntf})


def test_piped_console_prints_one_line_per_event_with_counts_out_of_the_study(tmp_path):
    c, buf = _console(interactive=False)
    (tmp_path / "error.txt").write_text("Traceback (most recent call last):\n  ...\nValueError: the loss is nan\n")
    c.expect("trials", [("a", "Finetune seed 0", 2), ("b", "TAALM seed 0", 2), ("c", "Oracle seed 0", 2)], 2)
    a, b = _trial("a"), _trial("b", str(tmp_path / "error.txt"))
    c.on_trial_start(0, [], a)
    c.on_trial_start(0, [], b)
    _epoch(c, a, 0, 0.0, 1.0)
    _epoch(c, a, 1, 0.0625, 0.875)
    c.on_trial_complete(0, [], a)
    c.on_trial_error(0, [], b)
    lines = buf.getvalue().splitlines()
    assert lines[0] == "g: trials: 3 trial(s), 2 at a time"
    assert "  Finetune seed 0 epoch 1/2: TO-LEARN 0.062  NTF 0.875" in lines
    done = [x for x in lines if x.startswith("trial done: Finetune seed 0")]
    assert len(done) == 1 and "(1/3 done, " in done[0] and "elapsed" in done[0], lines
    failed = [x for x in lines if x.startswith("trial FAILED: TAALM seed 0")]
    assert len(failed) == 1 and "ValueError: the loss is nan" in failed[0] and "1/3 done, 1 failed" in failed[0], lines
    assert c.live is None  # nothing drawn in place off a terminal


def test_every_loop_reports_in_its_own_words():
    """One report protocol (trainables/loop.py): the console reads a report's kind, not which keys it has."""
    c, buf = _console(interactive=False)
    c.expect("meta-training φ", [("m", "meta-train seed 0", None)], 1)
    c.on_trial_result(0, [], _trial("m"), {"kind": "check", "index": 4, "total": 8, "val_acc": 0.25,
                                           "object_weight_share": 0.5})
    c.expect("trials", [("t", "Finetune seed 0", 1)], 1)
    c.on_trial_result(0, [], _trial("t"), {"kind": "period", "index": 0, "total": 1, "label": "0910",
                                           "changed_ppl": 12.5, "unchanged_ppl": 9.25})
    lines = buf.getvalue().splitlines()
    assert "  meta-train seed 0 step 4/8: validation acc 0.250, weight on object tokens 50.0%" in lines, lines
    assert "  Finetune seed 0 period 1/2: 0910 CHANGED ppl 12.50  UNCHANGED ppl 9.25" in lines, lines
    assert c.views["m"].unit == "step" and c.views["t"].unit == "period"


def test_remaining_time_extrapolates_running_trials_and_counts_the_pending_ones():
    c, _ = _console(interactive=False)
    c.expect("trials", [("a", "A", 4), ("b", "B", 4), ("c", "C", 4)], 1)
    assert c.remaining() is None  # nothing known yet
    v = c.views["a"]
    v.state, v.started, v.first_result, v.epoch = "running", 100.0, 110.0, 1
    import orchestrator.console as console_mod

    real = console_mod.time.monotonic
    console_mod.time.monotonic = lambda: 120.0  # 10 s to the first epoch, then 10 s per epoch
    try:
        # a: expected 10 + 10 * 4 = 50 s, 20 s elapsed -> 30 s left; b and c pending at the mean (50 s) each
        assert abs(c.remaining() - (30 + 50 + 50)) < 1e-9
    finally:
        console_mod.time.monotonic = real


def test_terminal_console_draws_one_live_table_with_every_trial():
    c, buf = _console(interactive=True)
    c.expect("trials", [("a", "Finetune seed 0", 2), ("b", "TAALM seed 0", 2)], 2)
    a = _trial("a")
    c.on_trial_start(0, [], a)
    _epoch(c, a, 1, 0.25, 0.75)
    try:
        c.live.refresh()
        out = buf.getvalue()
    finally:
        c.close()
    for text in ("g · trials · 0/2 done", "Finetune seed 0", "TAALM seed 0", "running", "pending", "0.250", "0.750",
                 "1/2"):
        assert text in out, (text, out)
    assert "trial done" not in out  # no line-per-event output on a terminal


def test_chatter_goes_to_the_study_log_not_the_console(tmp_path, capsys):
    name = "taalm_test_noisy"
    log = configure_output(tmp_path, verbose=False, loggers=(name,))
    lg = logging.getLogger(name)
    lg.info("Started a local Ray instance.")
    lg.error("a real error")
    for h in lg.handlers:
        h.flush()
    err = capsys.readouterr().err
    assert "Started a local Ray instance." not in err and "a real error" in err
    text = log.read_text()
    assert log == tmp_path / "logs" / "study.log"
    assert "Started a local Ray instance." in text and "a real error" in text


def test_a_resumed_console_is_this_process_and_counts_what_was_done_before():
    """`taalm resume` restores Tune's experiment, callbacks included (pickled): the console it gets back is this
    process's (its clock started with the resume, not with the interrupted attempt), and the trials finished before
    the resume are counted as done, not timed."""
    import pickle

    old, _ = _console(interactive=False)
    old.t0 -= 1275  # the interrupted attempt started 21:15 before
    saved = pickle.dumps(old)  # what Tune keeps in its experiment state
    new, buf = _console(interactive=False)
    new.activate()
    restored = pickle.loads(saved)
    assert restored is new and restored.t0 == new.t0
    new.expect("trials", [("a", "Finetune seed 0", 2), ("b", "TAALM seed 0", 2), ("c", "Oracle seed 0", 2)], 1,
               done_before={"a", "b"})
    c = _trial("c")
    restored.on_trial_start(0, [], c)
    _epoch(restored, c, 1, 0.5, 1.0)
    _epoch(restored, c, 2, 0.75, 1.0)
    restored.on_trial_complete(0, [], c)
    lines = buf.getvalue().splitlines()
    assert lines[0] == "g: trials: 3 trial(s), 1 at a time, 2 done before this resume"
    done = [x for x in lines if x.startswith("trial done: Oracle seed 0")]
    assert len(done) == 1 and "(3/3 done (2 before this resume), " in done[0], lines


def test_a_restored_console_with_none_showing_prints_nothing(capsys):
    import pickle

    from orchestrator import console as mod

    c, _ = _console(interactive=False)
    saved = pickle.dumps(c)
    mod._ACTIVE.pop("console", None)
    restored = pickle.loads(saved)
    assert not isinstance(restored, StudyConsole)
    restored.on_trial_start(0, [], _trial("a"))
    assert capsys.readouterr().err == ""
