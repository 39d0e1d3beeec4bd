"""`taalm resume` after the driver is SIGKILLed mid-study: finished trials are not re-run, the others
finish, and MLflow ends with exactly one run per trial, every epoch logged once, none left RUNNING."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # starts Ray / MLflow servers

ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "ablations" / "smoke_tiny.yaml"


def _finished_trials(db: Path) -> int:
    if not db.is_file():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return con.execute("select count(*) from runs r join tags t on r.run_uuid = t.run_uuid "
                               "where t.key = 'taalm.role' and t.value = 'trial' and r.status = 'FINISHED'"
                               ).fetchone()[0]
    except sqlite3.Error:
        return 0


def _running_trial_epochs(db: Path) -> int:
    """The highest epoch a still-running trial has logged (its checkpoint of that epoch exists by then)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            row = con.execute("select max(m.step) from metrics m join runs r on m.run_uuid = r.run_uuid "
                              "join tags t on r.run_uuid = t.run_uuid where t.key = 'taalm.role' and "
                              "t.value = 'trial' and r.status = 'RUNNING' and m.key = 'to_learn_acc'").fetchone()
            return row[0] or 0
    except sqlite3.Error:
        return 0


def test_sigkill_then_resume(tmp_path):
    exe = str(Path(sys.executable).with_name("taalm"))
    # enough epochs that the second trial is still running when the first has finished (warm trials are fast)
    epochs = 12
    args = ["--set", "name=resume_me", "--set", "resources.max_concurrent=1", "--set", f"overrides.train.epochs={epochs}"]
    proc = subprocess.Popen([exe, "ablate", str(GRID), "--out", str(tmp_path), "--num-cpus", "1", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    db = tmp_path / "resume_me" / "mlflow.db"
    deadline = time.time() + 240
    while time.time() < deadline and _finished_trials(db) < 1 and proc.poll() is None:
        time.sleep(0.5)
    assert proc.poll() is None, "the study ended before it could be interrupted"
    assert _finished_trials(db) == 1
    time.sleep(1.5)  # Tune records a finished trial in its experiment state within ~1 s (TUNE_GLOBAL_CHECKPOINT_S)
    # ... and let the second trial checkpoint at least two epochs, and Tune record one of those checkpoints in its
    # experiment state (saved every TUNE_GLOBAL_CHECKPOINT_S = 1 s, later on a loaded machine), so that resuming
    # it has something to restore
    while time.time() < deadline and _running_trial_epochs(db) < 2 and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(3)
    killed_after_epoch = _running_trial_epochs(db)
    assert proc.poll() is None and 1 <= killed_after_epoch < epochs
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        done_before = {row[0] for row in con.execute(
            "select r.run_uuid from runs r join tags t on r.run_uuid = t.run_uuid where t.key = 'taalm.role' "
            "and t.value = 'trial' and r.status = 'FINISHED'")}
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
    killed_at_ms = time.time() * 1000
    proc.wait(timeout=30)
    time.sleep(2)

    r = subprocess.run([exe, "resume", str(tmp_path / "resume_me"), "--num-cpus", "1"], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| Finetune |" in r.stdout and "| Oracle |" in r.stdout

    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{db}")
    exp = c.get_experiment_by_name("resume_me")
    runs = c.search_runs([exp.experiment_id])
    trials = [x for x in runs if x.data.tags.get("taalm.role") == "trial"]
    assert sorted(t.data.tags["taalm.label"] for t in trials) == ["Finetune", "Oracle"]
    assert not [x for x in runs if x.info.status == "RUNNING"]
    for t in trials:
        assert t.info.status == "FINISHED"
        hist = c.get_metric_history(t.info.run_id, "to_learn_acc")
        assert [m.step for m in hist] == list(range(epochs + 1))
        if t.info.run_id in done_before:  # finished before the kill: not run again
            assert all(m.timestamp < killed_at_ms for m in hist)
            assert t.info.end_time < killed_at_ms
            assert "taalm.resumed_from_epoch" not in t.data.tags
        else:  # interrupted: continued from a checkpoint, not from scratch. Tune records which checkpoint is the
            # latest in its experiment state at most every second (TUNE_GLOBAL_CHECKPOINT_S), while MLflow logs an
            # epoch as its result arrives: a driver killed within that second resumes one checkpoint earlier and
            # redoes those epochs (the same values: training is deterministic; the logged ones are kept, once)
            assert 1 <= int(t.data.tags["taalm.resumed_from_epoch"]) <= killed_after_epoch


def test_epochs_the_killed_driver_never_logged_are_filled_in(tmp_path):
    """The race the SIGKILL can hit: Ray Train registered epoch 2's checkpoint, but the driver died before
    its MLflow callback logged epoch 2. The resumed attempt continues at epoch 3 and sends the restored
    curves once; the callback logs exactly the missing epochs (no duplicates of 0 and 1)."""
    from types import SimpleNamespace

    from orchestrator.mlflow_store import Study, default_tracking_uri
    from orchestrator.tracking import MlflowTrials

    study = Study(default_tracking_uri(tmp_path), "race", tmp_path)
    info = {"k1": {"run_name": "Finetune seed 0", "role": "trial", "params": {}, "config": {}, "tags": {}}}
    trial = SimpleNamespace(config={"t": {"trial_key": "k1"}}, trial_id="t1", last_result={}, error_file=None)
    cb = MlflowTrials(study, info)
    acc = [0.0, 0.25, 0.5, 0.75]
    for epoch in (0, 1):  # logged before the kill
        cb.on_trial_result(0, [], trial, {"kind": "epoch", "index": epoch, "to_learn_acc": acc[epoch],
                                          "resumed_from": -1})
    # a new driver (taalm resume) and the resumed attempt's first result
    cb = MlflowTrials(Study(study.uri, "race", tmp_path), info)
    restored = [{"index": e, "to_learn_acc": acc[e], "train_loss": loss} for e, loss in enumerate([None, 2.0, 1.5])]
    cb.on_trial_result(0, [], trial, {"kind": "epoch", "index": 3, "to_learn_acc": acc[3], "train_loss": 1.0,
                                      "resumed_from": 2, "restored": restored})
    rid = cb.run_ids["k1"]
    hist = study.client.get_metric_history(rid, "to_learn_acc")
    assert sorted((m.step, m.value) for m in hist) == list(enumerate(acc))
    assert sorted(m.step for m in study.client.get_metric_history(rid, "train_loss")) == [2, 3]
    assert study.client.get_run(rid).data.tags["taalm.resumed_from_epoch"] == "2"
