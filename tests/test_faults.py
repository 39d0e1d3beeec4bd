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
    epochs = 6
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
    assert "killed: trials: memory: a trial needs " in err  # the memory plan, told before the trials start
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


@integration
def test_trials_that_need_more_than_half_the_memory_run_one_at_a_time(tmp_path):
    """`resources.memory_gb` larger than half of what Ray holds for trials (Ray's logical memory, nothing is
    allocated): the study says "2 at a time asked, 1 fits", reserves that memory for each trial in Ray's scheduler,
    and the two trials run one after the other."""
    gb = 0.45 * psutil.virtual_memory().available / GB  # Ray holds ~70 % of the available memory for trials
    proc = _start(tmp_path, ["ablate", str(GRID), "--out", str(tmp_path), "--num-cpus", "2", "--set", "name=fit",
                             "--set", f"resources.memory_gb={gb:.2f}"])
    rc = _finish(proc)
    out, err = _console(tmp_path)
    assert rc == 0, err[-3000:]
    _assert_no_internals(out, err)
    assert "fit: trials: memory: 2 at a time asked, 1 fits in " in err and \
        f"a trial needs {gb:.2f} GB (resources.memory_gb)" in err, err
    assert "fit: trials: 2 trial(s), 1 at a time" in err
    c, trials = _runs(tmp_path / "fit" / "mlflow.db", "fit")
    first, second = sorted(trials.values(), key=lambda r: r.info.start_time)
    assert first.info.status == second.info.status == "FINISHED"
    last_of_first = max(m.timestamp for m in c.get_metric_history(first.info.run_id, "to_learn_acc"))
    first_of_second = min(m.timestamp for m in c.get_metric_history(second.info.run_id, "to_learn_acc"))
    assert last_of_first <= first_of_second  # one at a time: the second's first epoch after the first's last


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


def _refuses(p: Path, file: bool) -> bool:
    try:
        if file:
            with open(p, "r+b"):
                pass
        else:
            (p / ".probe").touch()
            (p / ".probe").unlink()
    except OSError:
        return True
    return False


def _make_unwritable(p: Path, file: bool = False) -> str:
    """Make directory ``p`` refuse new entries (or file ``p`` refuse writes), even to root (tests run as root here,
    where chmod does not stop writes): chmod (enough for a non-root user), else ``chattr +i`` (the immutable
    attribute: the kernel refuses, EPERM, root included). Returns how; skips when neither holds here."""
    os.chmod(p, 0o444 if file else 0o555)
    if _refuses(p, file):
        return "chmod"
    os.chmod(p, 0o644 if file else 0o755)
    if subprocess.run(["chattr", "+i", str(p)], capture_output=True).returncode == 0 and _refuses(p, file):
        return "chattr +i"
    subprocess.run(["chattr", "-i", str(p)], capture_output=True)
    pytest.skip(f"cannot make {p} unwritable here (neither chmod nor chattr +i stops a write)")


def _make_writable(p: Path, how: str) -> None:
    if how == "chattr +i":
        subprocess.run(["chattr", "-i", str(p)], check=True)
    else:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)


@integration
@pytest.mark.parametrize("fault", ["read-only checkpoint directory", "file-size limit", "read-only MLflow store"])
def test_a_refused_write_stops_the_study_cleanly_and_resume_finishes_it(tmp_path, fault):
    """Mid-study, a write is refused: the running trial's checkpoint directory in the study (Tune's trial
    directory) made read-only, its process given a file-size limit smaller than its checkpoint (``prlimit
    RLIMIT_FSIZE``: the kernel refuses the write with EFBIG as a full disk does with ENOSPC), or the study's MLflow
    store (sqlite) made read-only under the driver (Tune itself cannot go on). The study stops (exit 1) with the
    path, the free space and the `taalm resume` command, no traceback; once it is writable again (a new process for
    the limit), `taalm resume` finishes every trial, each epoch logged once."""
    epochs = 5
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
        elif fault == "file-size limit":
            _worker(int(pid), proc)
            limit = 4 * 2 ** 20  # below a checkpoint of tiny's weights (~13 MB), above the logs it writes
            resource.prlimit(int(pid), resource.RLIMIT_FSIZE, (limit, limit))
            where = "File too large"
        else:
            how = _make_unwritable(db, file=True)
            undo = lambda: _make_writable(db, how)  # noqa: E731
            where = f"cannot write {db}: "
        rc = _finish(proc)
    finally:
        if undo is not None:
            undo()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out, err = _console(tmp_path)
    assert rc == 1, err[-3000:]
    _assert_no_internals(out, err)
    assert "the study stopped: " + ("StorageError: " if fault != "read-only MLflow store" else "") + "cannot write " \
        in err, err
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
    resumed = stopped.data.tags.get("taalm.resumed_from_epoch")
    if fault == "read-only MLflow store":
        # Tune itself stopped (the store): the trial continues from the last checkpoint its experiment state had
        # recorded (saved every second, docs/RELIABILITY.md §2): epoch 0's or a later one, or none when the stop came
        # before the first save that held one (seen once, on a loaded machine): then it starts over, and every epoch
        # is still in MLflow exactly once (checked above)
        assert resumed is None or 0 <= int(resumed) <= epoch
    else:  # the trial's own write was refused: it continues from its last checkpoint
        assert 1 <= int(resumed) <= epoch


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
def test_a_search_retries_a_failed_trial(ray_local, tmp_path, monkeypatch):
    """`taalm tune` builds its Tuner with the grid's builder: resources.max_failures retries a failed search trial
    (before, a search ignored it). Every trial's first attempt crashes after epoch 1 (TAALM_INJECT_FAULT=1)."""
    from mlflow.tracking import MlflowClient

    from orchestrator.search import run_search

    monkeypatch.setenv("TAALM_INJECT_FAULT", "1")
    r = run_search(ROOT / "search_spaces" / "tiny_search.yaml",
                   ["num_samples=2", "resources.max_failures=1", "overrides.train.epochs=2"], out_root=tmp_path)
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


# ---- without Ray: the one-line reasons, the memory plan -----------------------------------------------------------

# the text Ray 2.60's memory monitor gave a killed trial on this machine (the report's first lines; the rest is the
# object store's statistics and the environment variables to set) and an ActorDiedError of a SIGKILLed worker,
# as Tune wrote them to the trials' error files
MONITOR = """Failure # 1 (occurred at 2026-11-30_17-44-02)
OutOfMemoryError: 1 worker(s) were killed due to the node running low on memory. Memory on the node (IP: 127.0.0.1, ID: 9446f73b) was 22.37GB used / 23.54GB limit (0.950300)
OOM kill reason: Memory usage 24019980288B exceeded threshold of 24012684697B (95.0% of 25276510208B limit)
Object store memory usage: [- objects spillable: 0
Ray killed 1 worker(s) based on the killing policy
Considered workers: [
Selected to kill: (Actor(05c8da11): job ID=01000000, lease ID=0000, task name=ImplicitFunc.__init__, required resources={}, pid=24613, actual memory used=3.05GB, worker ID=9042)
]
"""
SIGKILLED = """Failure # 1 (occurred at 2026-11-30_17-31-45)
The actor died unexpectedly before finishing this task.
\tclass_name: ImplicitFunc
\tactor_id: 2dab3b0fadbea1be097351b101000000
\tpid: 27758
\tnamespace: c2f509ff-918f-46ec-bfcc-d1fb4e507ddc
\tip: 127.0.0.1
The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit detail: Worker unexpectedly exits with a connection error code 2. End of file.
"""


def test_the_reason_of_a_killed_trial_is_one_line():
    from ray.exceptions import OutOfMemoryError, RayActorError

    from orchestrator.faults import TrialProcessLost, describe_failure

    assert describe_failure(MONITOR) == ("killed by Ray's memory monitor: node at 95 % of 23.5 GB (22.4 GB used, "
                                         "threshold 95 %); the trial's process (pid 24613) used 3.05 GB")
    assert describe_failure(SIGKILLED).startswith("the trial's process (pid 27758) died unexpectedly: killed from "
                                                  "outside (SIGKILL, the kernel's OOM killer) or crashed")
    # the error Tune gets for an OOM-killed actor task, as the patched actor manager hands it on: an actor error
    lost = TrialProcessLost.from_cause(OutOfMemoryError(MONITOR.split("\n", 1)[1].split(": ", 1)[1]))
    assert isinstance(lost, RayActorError)
    assert describe_failure(str(lost)).startswith("killed by Ray's memory monitor: node at 95 % of 23.5 GB")
    # retried trials: the error file holds every failure, the reason is the last one's
    assert describe_failure(SIGKILLED + MONITOR.replace("# 1", "# 2")).startswith("killed by Ray's memory monitor")
    # what is not a killed process keeps its error line
    assert describe_failure("Traceback ...\n  x\nValueError: the loss is nan\n") == "ValueError: the loss is nan"


def test_the_memory_plan_caps_concurrency_to_what_fits():
    from orchestrator.placement import GB, plan

    f = plan(9.5 * GB, None, asked=2, workers=1, nodes=[16.2 * GB], machine=23.5 * GB)
    assert (f.fits, f.request_gb) == (1, 9.5)
    assert f.message == ("2 at a time asked, 1 fits in 16.2 GB Ray holds for trials of this machine's 23.5 GB: "
                         "a trial needs 9.50 GB (estimated)")
    f = plan(9.5 * GB, 3.0, asked=4, workers=1, nodes=[16.2 * GB], machine=23.5 * GB)  # the user's figure wins
    assert f.fits == 4 and f.request_gb == 3.0 and "(resources.memory_gb)" in f.message and "up to 5 fit" in f.message
    f = plan(20 * GB, None, asked=2, workers=1, nodes=[16.2 * GB], machine=23.5 * GB)  # more than a node holds
    assert f.fits == 1 and f.request_gb == pytest.approx(16.2) and "more than 16.2 GB" in f.message
    f = plan(2 * GB, None, asked=4, workers=2, nodes=[5 * GB, 5 * GB], machine=8 * GB)  # 2 per node, 2 per trial
    assert f.fits == 2 and "on 2 nodes" in f.message
    f = plan(9.5 * GB, None, asked=4, workers=1, nodes=[100 * GB], machine=120 * GB, gpu=(2, 16 * GB),
             gpus_per_worker=0.5)  # two trials per GPU by Ray's count, one by memory
    assert f.fits == 2 and "2 fit on 2 GPU(s) of 16.0 GB" in f.message
    f = plan(9.5 * GB, None, asked=4, workers=1, nodes=[100 * GB], machine=120 * GB, gpu=None, gpus_per_worker=1)
    assert f.fits == 4 and "GPU memory unknown" in f.message


def test_the_plan_counts_trials_node_by_node():
    """Issue 33 item 3: what fits is counted on each node (its memory, CPUs and GPUs at once) and summed, never over
    memory added up across nodes; a head kept for the driver (0 CPUs) holds none; the message names the nodes."""
    from orchestrator.placement import GB, Node, plan

    head = Node("10.232.0.1", 24 * GB, cpus=0, gpus=0)
    a, b = Node("10.232.0.2", 16 * GB, cpus=8, gpus=0), Node("10.232.0.3", 7.5 * GB, cpus=8, gpus=0)
    f = plan(5 * GB, None, asked=8, workers=1, nodes=[head, a, b], machine=24 * GB, cpus_per_worker=1)
    # memory summed (47.5 GB) would say 9; the head holds none, 10.232.0.3 holds one
    assert f.fits == 4 and "4 fit on 2 of 3 nodes, worker slots 3 on 10.232.0.2, 1 on 10.232.0.3" in f.message
    assert "10.232.0.1" not in f.message and "47.5" not in f.message
    # the CPUs are the scarce part: 2 CPUs a worker leave 4 slots on 10.232.0.2
    f = plan(1 * GB, None, asked=8, workers=2, nodes=[a, b], machine=24 * GB, cpus_per_worker=2)
    assert f.fits == 4 and "worker slots 4 on 10.232.0.2, 4 on 10.232.0.3" in f.message
    # GPUs per node: one GPU each, one per worker
    g = [Node(f"10.0.0.{i}", 100 * GB, cpus=16, gpus=1) for i in (2, 3)]
    f = plan(5 * GB, None, asked=4, workers=1, nodes=g, machine=100 * GB, gpus_per_worker=1, cpus_per_worker=1)
    assert f.fits == 2 and "1 on 10.0.0.2, 1 on 10.0.0.3" in f.message
    # no node has a worker's CPUs and memory together: one at a time, said with what each node has
    f = plan(10 * GB, None, asked=2, workers=1, nodes=[head, b], machine=24 * GB, cpus_per_worker=1)
    assert f.fits == 1 and "no node has them all at once" in f.message and "10.232.0.1: 0 CPUs, 24.0 GB" in f.message
    # more than any node holds: the largest node is named, not the sum
    f = plan(30 * GB, None, asked=2, workers=1, nodes=[head, a, b], machine=24 * GB, cpus_per_worker=1)
    assert f.fits == 1 and "more than the largest node holds (24.0 GB)" in f.message
    # one machine whose CPUs, not its memory, run out says so
    f = plan(1 * GB, None, asked=4, workers=1, nodes=[Node("127.0.0.1", 16 * GB, cpus=2)], machine=24 * GB,
             cpus_per_worker=1)
    assert f.fits == 2 and "with its 2 CPU(s) (1 CPU(s) per worker)" in f.message


def test_ray_is_told_the_memory_a_trial_reserves():
    from orchestrator.ray_trainables import trial_resources
    from orchestrator.specs import Resources

    assert trial_resources(Resources(memory_gb=1.5)).bundles == [{"CPU": 1.0, "memory": int(1.5 * 2 ** 30)}]
    assert trial_resources(Resources()).bundles == [{"CPU": 1.0}]


def test_the_estimate_grows_with_what_a_trial_holds():
    """The formula's terms (docs/RELIABILITY.md): a larger model, batch or a frozen reference copy need more."""
    from orchestrator.memory import estimate_trial

    base = {"model": {"name": "smollm2-135m"}, "params": {"kind": "lora", "r": 16},
            "train": {"batch_size": 8, "max_length": 64}, "eval": {"batch_size": 32}}
    e = estimate_trial(base)
    assert e.parts["weights"] == pytest.approx(3 * 134_515_008 * 4)  # loading (file + model) and the kept copy
    bigger = estimate_trial({**base, "train": {"batch_size": 32, "max_length": 256}})
    full_rho1 = estimate_trial({**base, "params": {"kind": "full"}, "weighting": {"scheme": "rho1"}})
    assert bigger.total > e.total and full_rho1.parts["weights"] > e.parts["weights"]
    assert estimate_trial({**base, "model": {"name": "hf:not-on-disk"}}) is None


_THREAD_TRIAL = r"""
import sys, threading, torch
from orchestrator.memory import release_freed_memory
def rss(): return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20
keep = []
def trial():  # as Tune runs a trial of a warm process: in a thread of its own
    ts = [torch.ones(16 * 1024) for _ in range(4000)]  # 64 KB tensors, 250 MB, from the thread's malloc arena
    keep.extend(ts[::100])  # a few outlive the trial (caches do), pinning the arena's heaps
r0 = rss(); t = threading.Thread(target=trial); t.start(); t.join(); r1 = rss()
release_freed_memory(); r2 = rss()
print(r0, r1, r2)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_a_warm_process_gives_back_what_a_finished_trial_freed():
    """A trial's freed memory stays with a thread's malloc arena and was not reused by the next trial's thread:
    a warm SmolLM2 process grew ~1.2 GB per trial until Ray's memory monitor killed it. Here the same mechanism
    at 250 MB, in a fresh process: freed by the trial but still resident, then given back."""
    out = subprocess.run([sys.executable, "-c", _THREAD_TRIAL], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1], check=True).stdout
    r0, r1, r2 = map(float, out.split())
    assert r1 - r0 > 150, (r0, r1, r2)  # the mechanism is there (else this test shows nothing)
    assert r2 - r0 < 0.2 * (r1 - r0), (r0, r1, r2)


def test_every_lean_trial_releases_its_memory_even_when_it_fails(monkeypatch):
    from orchestrator import memory, ray_trainables
    from orchestrator.specs import Resources, TrialSpec

    released, outcome = [], {}

    def loop(spec, session):
        if outcome.get("fail"):
            raise RuntimeError("the loop failed")

    monkeypatch.setattr(ray_trainables, "loop_worker", loop)
    monkeypatch.setattr(memory, "release_freed_memory", lambda: released.append(1))
    spec = TrialSpec(kind="continual", trial_key="k", label="x", config={}, resources=Resources(),
                     storage_path="/nonexistent")
    import torch

    from trainables.models import keep_base_weights

    threads = torch.get_num_threads()
    try:
        ray_trainables.run_trial(spec)
        outcome["fail"] = True
        with pytest.raises(RuntimeError):
            ray_trainables.run_trial(spec)
    finally:  # run_trial sets this process's threads and kept weights as a trial process's
        torch.set_num_threads(threads)
        keep_base_weights(0)
    assert released == [1, 1]
