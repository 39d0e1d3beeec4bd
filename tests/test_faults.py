"""Faults a real machine makes, made for real (docs/RELIABILITY.md §1b): a trial's worker process SIGKILLed
mid-epoch, a trial killed by Ray's memory monitor (a test Ray instance with a low ``RAY_memory_usage_threshold``),
a trial's checkpoint directory made read-only mid-study and a trial process whose writes the kernel refuses
(a file-size limit, EFBIG, the way a full disk refuses them with ENOSPC). Each study runs as a user runs it,
``taalm ablate`` in a process of its own with its own local Ray instance, and its console is checked: the trial's
reason in one line, no traceback, no line of Ray's internals."""

from __future__ import annotations

import os
import resource
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "ablations" / "smoke_tiny.yaml"
EXE = str(Path(sys.executable).with_name("taalm"))
GB = 2 ** 30

# what must never reach the study's console: a traceback, Ray's raylet lines, Ray's exception names
INTERNALS = ("Traceback", "(raylet)", "ray.exceptions", "tune_controller", "Trial task failed")


def _start(out: Path, args: list[str], env: dict | None = None) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([EXE, *args], stdout=open(out / "stdout.txt", "w"), stderr=open(out / "stderr.txt", "w"),
                            start_new_session=True, env={**os.environ, **(env or {})}, cwd=ROOT)


def _finish(proc: subprocess.Popen, timeout: float = 420) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:  # never leave a study (and its Ray instance) behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _query(db: Path, sql: str):
    if not db.is_file():
        return None
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return con.execute(sql).fetchone()
    except sqlite3.Error:
        return None


def _running_trial(db: Path, min_epoch: int):
    """(trial key, pid, epoch) of a RUNNING trial that has logged epoch >= min_epoch, or None."""
    return _query(db, "select k.value, p.value, max(m.step) from runs r "
                      "join tags k on k.run_uuid = r.run_uuid and k.key = 'taalm.trial_key' "
                      "join tags p on p.run_uuid = r.run_uuid and p.key = 'taalm.pid' "
                      "join metrics m on m.run_uuid = r.run_uuid and m.key = 'to_learn_acc' "
                      f"where r.status = 'RUNNING' group by r.run_uuid having max(m.step) >= {min_epoch} limit 1")


def _wait_running(proc, db: Path, min_epoch: int, timeout: float = 240):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        row = _running_trial(db, min_epoch)
        if row is not None:
            return row
        time.sleep(0.2)
    raise AssertionError(f"no trial reached epoch {min_epoch} while the study ran (exit {proc.poll()}): "
                         f"{(db.parent.parent / 'stderr.txt').read_text()[-2000:] if db.parent.parent.exists() else ''}")


def _runs(db: Path, name: str):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{db}")
    exp = c.get_experiment_by_name(name)
    return c, {r.data.tags["taalm.label"]: r for r in c.search_runs([exp.experiment_id], "tags.`taalm.role` = 'trial'")}


def _console(out: Path) -> tuple[str, str]:
    return (out / "stdout.txt").read_text(), (out / "stderr.txt").read_text()


def _assert_no_internals(*texts: str) -> None:
    for text in texts:
        for bad in INTERNALS:
            assert bad not in text, (bad, text[-3000:])


def _worker(pid: int, driver: subprocess.Popen) -> psutil.Process:
    """The trial's process: a Ray worker of the study's own instance, not its driver."""
    p = psutil.Process(pid)
    assert pid != driver.pid and "ray::" in " ".join(p.cmdline()), p.cmdline()
    assert os.getsid(pid) == os.getsid(driver.pid)  # started by the study (its session), not someone else's Ray
    return p


integration = pytest.mark.integration  # these start Ray (each study its own local instance)


@integration
def test_sigkilled_trial_is_failed_then_retried_from_its_checkpoint(tmp_path):
    """SIGKILL of a running trial's worker process mid-study (what the kernel's OOM killer does): the trial is
    FAILED with a one-line reason, retried (max_failures 1) from its last epoch checkpoint, the other trial runs,
    the study prints its table; nothing from Ray's internals on the console."""
    epochs = 8
    proc = _start(tmp_path, ["ablate", str(GRID), "--out", str(tmp_path), "--num-cpus", "2", "--set", "name=killed",
                             "--set", "resources.max_concurrent=1", "--set", "resources.max_failures=1",
                             "--set", f"overrides.train.epochs={epochs}"])
    db = tmp_path / "killed" / "mlflow.db"
    try:
        key, pid, epoch = _wait_running(proc, db, 2)
        _worker(int(pid), proc)
        os.kill(int(pid), signal.SIGKILL)
        rc = _finish(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out, err = _console(tmp_path)
    assert rc == 0, err[-3000:]
    assert "| Finetune |" in out and "| Oracle |" in out
    _assert_no_internals(out, err)
    c, trials = _runs(db, "killed")
    killed = next(t for t in trials.values() if t.data.tags["taalm.trial_key"] == key)
    other = next(t for t in trials.values() if t.data.tags["taalm.trial_key"] != key)
    label = killed.data.tags["taalm.label"]
    reason = killed.data.tags["taalm.retry_reason"]
    assert f"the trial's process (pid {pid}) died unexpectedly" in reason, reason
    assert f"trial retried: {label} seed 0: {reason}" in err
    assert killed.info.status == "FINISHED" and killed.data.tags["taalm.retries"] == "1"
    assert 1 <= int(killed.data.tags["taalm.resumed_from_epoch"]) <= epoch  # from its checkpoint, not from scratch
    assert other.info.status == "FINISHED" and "taalm.retries" not in other.data.tags
    for t in (killed, other):
        assert sorted(m.step for m in c.get_metric_history(t.info.run_id, "to_learn_acc")) == list(range(epochs + 1))
    assert "ActorDiedError" in (tmp_path / "killed" / "logs" / "study.log").read_text()  # kept in the study log


def _ray_used() -> float:
    """The node's used memory as Ray's memory monitor counts it (total - available, /proc/meminfo)."""
    v = psutil.virtual_memory()
    return float(v.total - v.available)


@integration
def test_a_trial_killed_by_rays_memory_monitor_fails_alone(tmp_path):
    """A test Ray instance whose memory monitor kills above (used now + 2 GB): a trial whose model needs ~4 GB
    (tiny's shape at hidden size 3072) is killed by it, recorded FAILED (or retried) with a reason naming memory,
    and the study completes with its table. The small trial runs first, under the threshold. The machine is
    shared: others' memory moves the node's use, so a small trial killed too is accepted if its reason is the
    memory monitor's (never a crashed study)."""
    threshold = (_ray_used() + 2 * GB) / psutil.virtual_memory().total
    proc = _start(tmp_path, ["ablate", str(GRID), "--out", str(tmp_path), "--num-cpus", "2", "--set", "name=oom",
                             "--set", "axes={}", "--set", "zip=[{label: [small, big], model.tiny.hidden_size: [64, 3072], "
                             "model.tiny.intermediate_size: [128, 12288]}]", "--set", "overrides.params.kind=lora",
                             "--set", "resources.max_concurrent=1", "--set", "resources.max_failures=1"],
                  env={"RAY_memory_usage_threshold": f"{threshold:.4f}"})
    rc = _finish(proc)
    out, err = _console(tmp_path)
    assert rc == 0, err[-3000:]
    assert "| small |" in out and "| big |" in out
    _assert_no_internals(out, err)
    _, trials = _runs(tmp_path / "oom" / "mlflow.db", "oom")
    big = trials["big"]
    reasons = [big.data.tags.get("taalm.failure", ""), big.data.tags.get("taalm.retry_reason", "")]
    assert any(r.startswith("killed by Ray's memory monitor: node at ") and "GB" in r for r in reasons), reasons
    assert "killed by Ray's memory monitor" in err
    small = trials["small"]
    if small.info.status != "FINISHED":
        assert small.data.tags["taalm.failure"].startswith("killed by Ray's memory monitor"), small.data.tags
    for t in trials.values():
        assert t.info.status in ("FINISHED", "FAILED")


def _make_unwritable(d: Path) -> str:
    """Make directory ``d`` refuse new entries, even to root (tests run as root here, where chmod does not stop
    writes): ``chattr +i`` (the immutable attribute: the kernel refuses, EPERM), else chmod 555 for a non-root
    user. Returns how; skips when neither holds on this file system."""
    how = "chmod 555"
    os.chmod(d, 0o555)
    probe = d / ".probe"
    try:
        probe.touch()
        probe.unlink()
        os.chmod(d, 0o755)
        subprocess.run(["chattr", "+i", str(d)], check=True, capture_output=True)
        how = "chattr +i"
        probe.touch()
    except (OSError, subprocess.CalledProcessError, FileNotFoundError):
        return how
    probe.unlink()
    subprocess.run(["chattr", "-i", str(d)], capture_output=True)
    pytest.skip(f"cannot make {d} unwritable here (neither chmod nor chattr +i stops a write)")


def _make_writable(d: Path, how: str) -> None:
    if how == "chattr +i":
        subprocess.run(["chattr", "-i", str(d)], check=True)
    else:
        os.chmod(d, 0o755)


@integration
@pytest.mark.parametrize("fault", ["read-only checkpoint directory", "file-size limit"])
def test_a_refused_write_stops_the_study_cleanly_and_resume_finishes_it(tmp_path, fault):
    """Mid-study, the running trial's writes are refused: its checkpoint directory in the study (Tune's trial
    directory) made read-only, or its process given a file-size limit smaller than its checkpoint
    (``prlimit RLIMIT_FSIZE``: the kernel refuses the write with EFBIG as a full disk does with ENOSPC). The study
    stops (exit 1) with the path, the free space and the `taalm resume` command, no traceback; once the directory
    is writable again (a new process for the limit), `taalm resume` finishes every trial, each epoch logged once."""
    epochs = 8
    name = "refused"
    proc = _start(tmp_path, ["ablate", str(GRID), "--out", str(tmp_path), "--num-cpus", "2", "--set", f"name={name}",
                             "--set", "resources.max_concurrent=1", "--set", "resources.max_failures=1",
                             "--set", f"overrides.train.epochs={epochs}"])
    study = tmp_path / name
    db = study / "mlflow.db"
    undo = None
    try:
        key, pid, epoch = _wait_running(proc, db, 1)
        if fault == "read-only checkpoint directory":
            trial_dir = study / "tune" / name / key
            how = _make_unwritable(trial_dir)
            undo = lambda: _make_writable(trial_dir, how)  # noqa: E731
            where = str(trial_dir)
        else:
            _worker(int(pid), proc)
            limit = 4 * 2 ** 20  # below a checkpoint of tiny's weights (~13 MB), above the logs it writes
            resource.prlimit(int(pid), resource.RLIMIT_FSIZE, (limit, limit))
            where = "File too large"
        rc = _finish(proc)
    finally:
        if undo is not None:
            undo()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out, err = _console(tmp_path)
    assert rc == 1, err[-3000:]
    _assert_no_internals(out, err)
    assert "the study stopped: StorageError: cannot write " in err, err
    assert where in err and " free on " in err, err
    assert f"taalm resume {study}" in err
    assert "| Finetune |" not in out  # no table of a study that did not finish

    r = subprocess.run([EXE, "resume", str(study), "--num-cpus", "2"], capture_output=True, text=True, timeout=420,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_no_internals(r.stdout, r.stderr)
    assert "| Finetune |" in r.stdout and "| Oracle |" in r.stdout
    c, trials = _runs(db, name)
    assert sorted(trials) == ["Finetune", "Oracle"]
    for t in trials.values():
        assert t.info.status == "FINISHED", t.data.tags
        assert sorted(m.step for m in c.get_metric_history(t.info.run_id, "to_learn_acc")) == list(range(epochs + 1))
    stopped = next(t for t in trials.values() if t.data.tags["taalm.trial_key"] == key)
    assert 1 <= int(stopped.data.tags["taalm.resumed_from_epoch"]) <= epoch


def test_a_refused_checkpoint_write_names_the_path_and_the_free_space_and_keeps_the_old_one(tmp_path):
    """A checkpoint written over an earlier one by a process whose writes the kernel refuses past 64 KB
    (RLIMIT_FSIZE in a child process): a StorageError naming the directory and the free space; the earlier
    checkpoint is intact and no temporary directory is left."""
    code = f"""
import resource, sys, torch
from pathlib import Path
from trainables.checkpoint import StorageError, load_loop_checkpoint, save_loop_checkpoint
d = Path({str(tmp_path)!r}) / "checkpoint"
p = {{"w": torch.nn.Parameter(torch.ones(64))}}
opt = torch.optim.AdamW(p.values())
save_loop_checkpoint(d, p, opt, {{"epoch": 1}})
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
big = {{"w": torch.nn.Parameter(torch.zeros(64))}}
try:
    save_loop_checkpoint(d, {{"w": torch.nn.Parameter(torch.zeros(1 << 20))}}, opt, {{"epoch": 2}})
except StorageError as e:
    print("STORAGE", e)
state = load_loop_checkpoint(d, big, opt)
print("EPOCH", state["epoch"], float(big["w"].sum()))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-2000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("STORAGE"))
    assert f"cannot write {tmp_path / 'checkpoint'}: File too large (" in line and " free on " in line, line
    assert "EPOCH 1 64.0" in r.stdout  # the epoch-1 checkpoint, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # nothing half-written beside it


@integration
def test_a_search_retries_a_failed_trial(tmp_path, monkeypatch):
    """`taalm tune` builds its Tuner with the grid's builder: resources.max_failures retries a failed search trial
    (before, a search ignored it). Every trial's first attempt crashes after epoch 1 (TAALM_INJECT_FAULT=1)."""
    import ray
    from mlflow.tracking import MlflowClient

    from orchestrator.search import run_search
    from orchestrator.study import init_ray

    monkeypatch.setenv("TAALM_INJECT_FAULT", "1")
    init_ray(None, num_cpus=2)
    try:
        r = run_search(ROOT / "search_spaces" / "tiny_search.yaml",
                       ["num_samples=2", "resources.max_failures=1", "overrides.train.epochs=2"], out_root=tmp_path)
    finally:
        ray.shutdown()
    assert r["trials"] == 2 and r["failed"] == 0
    c = MlflowClient(r["tracking_uri"])
    exp = c.get_experiment_by_name("tiny_search")
    trials = c.search_runs([exp.experiment_id], "tags.`taalm.role` = 'trial'")
    assert len(trials) == 2
    for t in trials:
        assert t.info.status == "FINISHED"
        assert t.data.tags["taalm.retries"] == "1" and "injected fault after epoch 1" in t.data.tags["taalm.retry_reason"]
        assert t.data.tags["taalm.resumed_from_epoch"] == "1"
        assert sorted(m.step for m in c.get_metric_history(t.info.run_id, "to_learn_acc")) == [0, 1, 2]
