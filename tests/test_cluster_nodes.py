"""A real Ray cluster whose nodes share no disk (issues 27 and 33): a head (the driver's machine, no CPUs for trials)
and two worker nodes of one CPU each, every node in its own network namespace on a private bridge, each worker
in its own mount namespace (its own /tmp, so its own Ray session directory and TAALM_CACHE; the driver's study
directory not visible), sharing only the study's storage: a directory bind-mounted into every node (the NFS case)
or moto's S3 server on the head (tests/nscluster.py). Needs root; under CI=true a machine where namespaces cannot be
made fails these tests with the reason, never skips them."""

import re
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest

from nscluster import RayLab, require

pytestmark = pytest.mark.integration  # starts Ray clusters, an S3 server

ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "tests" / "fixtures" / "cluster_tiny.yaml"
WORKERS = (2, 3)  # the worker nodes' numbers (n1 is the head)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    require()
    nfs = tmp_path_factory.mktemp("nfs")  # under /tmp: hidden on the workers, bind-mounted back into each
    lab = RayLab(workers=2, worker_cpus=1, head_cache=tmp_path_factory.mktemp("head-cache"), share=[str(nfs)],
                 s3=True).start()
    try:
        yield lab, nfs
    finally:
        lab.stop()


class Driver:
    """`taalm ARGS` on the head node in the background, its console read line by line as it comes."""

    def __init__(self, lab: RayLab, args: list[str]):
        self.lines: list[str] = []
        self.proc = lab.driver(args, cwd=str(ROOT), background=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = 600) -> re.Match:
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            for line in self.lines[seen:]:
                m = re.search(pattern, line)
                if m:
                    return m
            seen = len(self.lines)
            assert self.proc.poll() is None or seen < len(self.lines), f"ended before {pattern!r}:\n" + self.text()
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} within {timeout} s:\n" + self.text())

    def wait_for_each(self, pattern: str, n: int, timeout: float = 600) -> set[str]:
        """Until ``n`` different values of the pattern's first group were printed (e.g. n trials at epoch 1)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = {m.group(1) for m in map(lambda x: re.search(pattern, x), list(self.lines)) if m}
            if len(found) >= n:
                return found
            assert self.proc.poll() is None, f"ended before {n} x {pattern!r}:\n" + self.text()
            time.sleep(0.2)
        raise AssertionError(f"not {n} x {pattern!r} within {timeout} s:\n" + self.text())

    def finish(self, timeout: float = 900) -> int:
        code = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=30)
        return code

    def text(self) -> str:
        return "\n".join(self.lines)[-6000:]


def _runs(study_dir: Path) -> list[dict]:
    """Every run of a study's MLflow store: role, label, seed, status, tags, and each metric's logged steps."""
    with sqlite3.connect(study_dir / "mlflow.db") as db:
        runs = {rid: {"status": st, "tags": {}, "steps": {}} for rid, st in db.execute("select run_uuid, status from runs")}
        for rid, k, v in db.execute("select run_uuid, key, value from tags"):
            runs[rid]["tags"][k] = v
        for rid, k, step in db.execute("select run_uuid, key, step from metrics"):
            runs[rid]["steps"].setdefault(k, []).append(step)
    out = []
    for r in runs.values():
        t = r["tags"]
        out.append({"role": t.get("taalm.role"), "label": t.get("taalm.label"), "seed": t.get("taalm.seed"),
                    "status": r["status"], "node": t.get("taalm.node_id"), "tags": t, "steps": r["steps"]})
    return out


def _worker_ids(lab: RayLab) -> dict[str, int]:
    """Ray node id -> worker node number, from the head's GCS (asked on the head node)."""
    code = ("import json, ray; ray.init(address='%s', log_to_driver=False); "
            "print(json.dumps({n['NodeID']: n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']}))"
            % lab.address)
    import json
    import sys

    p = lab.lab.run(1, [sys.executable, "-c", code], env=lab.env(1), timeout=120)
    ips = json.loads(p.stdout.strip().splitlines()[-1])
    return {nid: int(ip.rsplit(".", 1)[1]) for nid, ip in ips.items() if int(ip.rsplit(".", 1)[1]) in WORKERS}


def _running_after_epoch(d: "Driver", study: Path, epoch: int, workers: dict[str, int],
                         timeout: float = 600) -> tuple[str, int]:
    """A trial running now on a worker node that has reported ``epoch`` (so its checkpoint is in the storage):
    its display name and its node's number."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert d.proc.poll() is None, d.text()
        try:
            runs = _runs(study) if (study / "mlflow.db").is_file() else []
        except sqlite3.Error:  # the driver is writing: ask again
            runs = []
        for r in runs:
            if r["role"] == "trial" and r["status"] == "RUNNING" and r["node"] in workers and \
                    max(r["steps"].get("to_learn_acc", [-1])) == epoch:
                return f"{r['label']} seed {r['seed']}", workers[r["node"]]
        time.sleep(0.3)
    raise AssertionError(f"no trial at epoch {epoch} within {timeout} s:\n" + d.text())


def _trial_pids(lab: RayLab, node: int) -> list[int]:
    import psutil

    out = []
    for pid in lab.lab.pids(node):
        try:
            if "ImplicitFunc" in " ".join(psutil.Process(pid).cmdline()):
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _every_epoch_once(trials: list[dict], epochs: int) -> None:
    for t in trials:
        assert t["status"] == "FINISHED", t
        assert sorted(t["steps"]["to_learn_acc"]) == list(range(epochs + 1)), t  # each epoch logged exactly once


def test_a_storage_some_node_cannot_see_is_refused_before_anything_starts(cluster, tmp_path):
    lab, _ = cluster
    local = tmp_path / "only-on-the-driver"
    t0 = time.monotonic()
    p = lab.driver(["ablate", str(GRID), "--address", lab.address, "--out", str(tmp_path / "out"),
                    "--storage", str(local)], cwd=str(ROOT), timeout=300)
    took = time.monotonic() - t0
    assert p.returncode == 2, p.stdout[-3000:] + p.stderr[-3000:]
    assert "--storage" in p.stderr and "2 of 3 nodes cannot see it" in p.stderr, p.stderr[-3000:]
    assert all(lab.lab.ip(i) in p.stderr for i in WORKERS), p.stderr[-3000:]
    assert took < 60, took
    assert not (tmp_path / "out" / "cluster_tiny" / "study.json").exists()  # nothing half-written


def test_a_trial_no_node_fits_is_refused_within_a_minute(cluster, tmp_path):
    lab, nfs = cluster
    t0 = time.monotonic()
    p = lab.driver(["ablate", str(GRID), "--address", lab.address, "--out", str(tmp_path / "out"),
                    "--storage", str(nfs / "refused"), "--set", "resources.cpus_per_worker=2"],
                   cwd=str(ROOT), timeout=300)
    assert p.returncode == 2, p.stdout[-3000:] + p.stderr[-3000:]
    err = " ".join(p.stderr.split())
    assert "needs 2 CPUs on one node, but none of the 3 nodes has them" in err, err[-3000:]
    assert "resources.cpus_per_worker" in err and "the largest node" in err, err[-3000:]
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "out" / "cluster_tiny" / "study.json").exists()


def test_taalm_trials_on_both_nodes_fetch_phi_from_the_shared_directory(cluster, tmp_path):
    """The meta stage trains φ on one worker node; the TAALM trials run on both (one CPU each, two at a time), so
    one of them fetches φ through the storage into its own node's cache; the epoch-0 evaluations go there too."""
    lab, nfs = cluster
    storage = nfs / "grid"
    p = lab.driver(["ablate", str(GRID), "--address", lab.address, "--out", str(tmp_path), "--storage",
                    str(storage)], cwd=str(ROOT), timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    assert "| TAALM |" in p.stdout and "4 trials, 0 failed" in p.stderr, p.stderr[-3000:]
    runs = _runs(tmp_path / "cluster_tiny")
    workers = _worker_ids(lab)
    meta = [r for r in runs if r["role"] == "meta"]
    taalm = [r for r in runs if r["role"] == "trial" and r["label"] == "TAALM"]
    assert len(meta) == 1 and meta[0]["status"] == "FINISHED" and meta[0]["node"] in workers, meta
    assert len(taalm) == 2 and {r["node"] for r in taalm} == set(workers), (taalm, workers)
    _every_epoch_once([r for r in runs if r["role"] == "trial"], 2)
    assert list((storage / "phi").glob("*/manifest.json")) and list((storage / "initial_eval").glob("*.json"))
    assert (storage / "tune" / "cluster_tiny").is_dir()


def test_an_input_error_on_a_worker_reaches_the_console_the_table_and_mlflow(cluster, tmp_path):
    """The data directory exists on the driver's machine only: every trial fails on its worker with the
    InputError naming it (it used to reach the table as a TypeError: Ray copies the exception)."""
    lab, nfs = cluster
    data = tmp_path / "lama-on-the-driver-only"
    shutil.copytree(ROOT / "data" / "lama_ckl", data)
    p = lab.driver(["ablate", str(GRID), "--address", lab.address, "--out", str(tmp_path), "--storage",
                    str(nfs / "input-error"), "--set", f"overrides.data.dir={data}",
                    "--set", "axes={weighting.scheme: [uniform]}", "--set", "seeds=[0]"], cwd=str(ROOT), timeout=600)
    out = p.stdout + p.stderr
    want = f"InputError: {data}: LAMA-CKL data directory not found"
    assert p.returncode == 0, out[-4000:]
    assert f"trial FAILED: Finetune seed 0: {want}" in p.stderr, p.stderr[-3000:]
    assert f"- Finetune seed 0 (FAILED): {want}" in p.stdout, p.stdout[-3000:]
    assert "TypeError" not in out
    [run] = [r for r in _runs(tmp_path / "cluster_tiny") if r["role"] == "trial"]
    assert run["status"] == "FAILED" and run["tags"]["taalm.failure"] == want


def test_over_s3_a_killed_trial_resumes_and_a_killed_driver_resumes_from_storage(cluster, tmp_path):
    """Storage on the S3 server: a trial's process SIGKILLed after its first epoch is retried from its checkpoint
    in the storage (max_failures 1); then the driver itself is SIGKILLed, and `taalm resume` continues the study
    from the storage (Tune's state there) to the same trials, every epoch logged once."""
    lab, _ = cluster
    uri = lab.s3_uri("killed")
    args = ["--address", lab.address, "--set", "resources.max_failures=1", "--set", "overrides.train.epochs=3"]
    d = Driver(lab, ["ablate", str(GRID), "--out", str(tmp_path), "--storage", uri] + args)
    study = tmp_path / "cluster_tiny"
    try:
        name, node = _running_after_epoch(d, study, 1, _worker_ids(lab))
        victims = _trial_pids(lab, node)
        assert victims, d.text()
        for pid in victims:
            subprocess.run(["kill", "-9", str(pid)])
        d.wait_for(rf"trial retried: {name}: ", timeout=300)
        d.wait_for(rf"^  {name} epoch 2/3", timeout=600)  # on again after its retry
        d.proc.send_signal(signal.SIGKILL)  # the driver dies mid-study
        d.finish(timeout=60)
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
    study = tmp_path / "cluster_tiny"
    assert (study / "study.json").is_file()
    p = lab.driver(["resume", str(study), "--address", lab.address], cwd=str(ROOT), timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    assert "4 trials, 0 failed" in p.stderr, p.stderr[-3000:]
    trials = [r for r in _runs(study) if r["role"] == "trial"]
    assert len(trials) == 4
    _every_epoch_once(trials, 3)
    retried = [t for t in trials if t["tags"].get("taalm.retries")]
    assert retried and all(int(t["tags"].get("taalm.resumed_from_epoch", "-1")) >= 1 for t in retried), \
        [{k: v for k, v in t["tags"].items() if k.startswith("taalm.") and k != "taalm.failure"} for t in retried]


def test_a_worker_node_lost_mid_study_says_so_and_its_trials_resume_elsewhere(cluster, tmp_path):
    """A worker node killed whole (every process in it) while its trial runs: the trial is retried on the other
    node from its checkpoint in the storage, the console says which node was lost, the study ends with its table,
    and no epoch is logged twice. The node is started again afterwards."""
    lab, nfs = cluster
    d = Driver(lab, ["ablate", str(GRID), "--address", lab.address, "--out", str(tmp_path), "--storage",
                     str(nfs / "node-lost"), "--set", "resources.max_failures=1", "--set",
                     "overrides.train.epochs=3", "--set", "axes={weighting.scheme: [uniform]}"])
    victim = None
    try:
        name, victim = _running_after_epoch(d, tmp_path / "cluster_tiny", 1, _worker_ids(lab))
        lab.lab.kill_node(victim)
        m = d.wait_for(rf"trial retried: ({name}): (.*)", timeout=300)
        assert m.group(2).startswith(f"node {lab.lab.ip(victim)} lost (its processes died); resumed from epoch "), \
            m.group(0)
        assert d.finish(timeout=900) == 0, d.text()
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
        if victim is not None:
            lab.start_worker(victim)
    assert "2 trials, 0 failed" in d.text(), d.text()
    trials = [r for r in _runs(tmp_path / "cluster_tiny") if r["role"] == "trial"]
    _every_epoch_once(trials, 3)
    lost = [t for t in trials if t["tags"].get("taalm.retries")]
    assert len(lost) == 1 and lost[0]["tags"]["taalm.retry_reason"].startswith(f"node {lab.lab.ip(victim)} lost")
