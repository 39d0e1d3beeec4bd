"""`taalm ray start` / `status` / `stop`: a local Ray instance kept between studies, bound to 127.0.0.1 only with
token authentication; a study attaches to it only when it is alive and was started from the same environment,
and runs on it whatever its CPU count (trials queue, the meta stage asks for no more than there is); `taalm ray
stop` stops every process of it and nothing else."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # starts Ray / MLflow servers

ROOT = Path(__file__).resolve().parents[1]
TAALM = str(Path(sys.executable).with_name("taalm"))
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def listening(procs) -> set[tuple[str, int]]:
    import psutil

    out = set()
    for p in procs:
        try:
            conns = p.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        out |= {(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}
    return out


def _taalm(args, env, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([TAALM, *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_taalm_ray_start_attach_and_stop(tmp_path):
    """A 1-CPU instance from `taalm ray start`: every listening socket of its processes on 127.0.0.1, its GCS with
    token authentication; `taalm ray status` reports it. A study whose grid asks for 2 trials at a time and 2 CPUs
    for meta-training attaches to it and completes on its one CPU: the meta stage on 1 CPU, then the trials one
    after the other. `taalm ray stop` stops every process of the instance and forgets it."""
    import psutil
    from mlflow.tracking import MlflowClient

    record = tmp_path / "head.json"
    env = {**os.environ, "TAALM_RAY_HEAD": str(record)}
    r = _taalm(["ray", "start", "--num-cpus", "1"], env)
    assert r.returncode == 0 and "started: local Ray instance at 127.0.0.1:" in r.stderr, r.stderr[-3000:]
    rec = json.loads(record.read_text())
    head = psutil.Process(rec["pid"])
    tree = [head] + head.children(recursive=True)
    try:
        socks = listening(tree)
        assert len(socks) >= 4 and {ip for ip, _ in socks} <= LOOPBACK, socks  # GCS, raylet, agents, ...
        assert ("127.0.0.1", int(rec["address"].rsplit(":", 1)[1])) in {(ip.replace("::ffff:", ""), port)
                                                                         for ip, port in socks}
        gcs = [p for p in tree if p.name().startswith("gcs_server")]
        assert gcs and gcs[0].environ().get("RAY_AUTH_MODE") == "token"
        again = _taalm(["ray", "start"], env)  # a second start finds the running one
        assert again.returncode == 0 and f"already running: local Ray instance at {rec['address']}" in again.stderr
        status = _taalm(["ray", "status"], env)
        assert f"running: local Ray instance at {rec['address']} (1 CPUs)" in " ".join(status.stderr.split())

        grid = tmp_path / "g.yaml"
        grid.write_text(f"""name: attached
base: {ROOT / 'examples' / 'run_tiny.yaml'}
overrides: {{train.epochs: 1}}
axes: {{weighting.scheme: [uniform, train_attention]}}
labels: {{weighting.scheme: {{uniform: Finetune, train_attention: TAALM}}}}
meta:
  config: {ROOT / 'examples' / 'meta_tiny.yaml'}
  overrides: {{meta.steps: 2, meta.val_every: 2, meta.val_size: 2, meta.batch_size: 2, meta.pool_size: 8}}
resources: {{workers: 1, cpus_per_worker: 1, max_concurrent: 2}}
""")
        # --retrain-phi: the meta stage runs even when an earlier run left this φ in the cache
        p = _taalm(["ablate", str(grid), "--out", str(tmp_path / "studies"), "--retrain-phi"], env)
        assert p.returncode == 0, p.stderr[-4000:]
        assert f"attached: Ray: attached to the local Ray instance at {rec['address']} (1 CPUs" in p.stderr
        c = MlflowClient(f"sqlite:///{tmp_path / 'studies' / 'attached' / 'mlflow.db'}")
        runs = c.search_runs([c.get_experiment_by_name("attached").experiment_id])
        meta = [x for x in runs if x.data.tags.get("taalm.role") == "meta"]
        trials = [x for x in runs if x.data.tags.get("taalm.role") == "trial"]
        assert len(meta) == 1 and meta[0].info.status == "FINISHED"
        assert sorted(t.data.tags["taalm.label"] for t in trials) == ["Finetune", "TAALM"]
        assert all(t.info.status == "FINISHED" for t in trials)
        first, second = sorted(trials, key=lambda t: t.info.start_time)
        assert first.info.end_time <= second.info.start_time  # one CPU: one trial at a time
        assert {t.data.tags["taalm.node_id"] for t in trials} == {head_node_id(rec)}
    finally:
        stop = _taalm(["ray", "stop"], env)
    assert stop.returncode == 0 and f"stopped the local Ray instance at {rec['address']}" in stop.stderr
    _, alive = psutil.wait_procs(tree, timeout=30)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive
    assert not record.exists()
    assert "no instance to attach to" in _taalm(["ray", "status"], env).stderr
    assert "no running instance recorded" in _taalm(["ray", "stop"], env).stderr


def head_node_id(rec: dict) -> str:
    """The node id of a running head, read from its raylet's command line."""
    import psutil

    for p in psutil.Process(rec["pid"]).children(recursive=True):
        for arg in p.cmdline():
            if arg.startswith("--node_id="):
                return arg.split("=", 1)[1]
    raise AssertionError("no raylet found")


def test_a_study_attaches_only_to_a_live_instance_of_its_own_environment(ray_head, monkeypatch, tmp_path):
    """The session's instance is found while it runs and this process's environment is the one it was started
    from; with another PYTHONPATH (its workers would import other code) or a record of a dead instance, a study
    starts a Ray of its own instead, and says why."""
    from orchestrator.local_ray import RECORD_ENV, running_head
    from orchestrator.local_ray import local_cpus

    rec, why = running_head()
    assert rec is not None and rec["address"] == ray_head["address"] and why == ""
    assert local_cpus(None, None) == 2 and local_cpus(None, 3) == 3 and local_cpus("local", None) == os.cpu_count()
    assert local_cpus("127.0.0.1:6379", None) is None  # a cluster: its CPUs are not known before attaching
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", "") + os.pathsep + str(tmp_path))
    rec, why = running_head()
    assert rec is None and "another environment (pythonpath differ)" in why
    monkeypatch.undo()
    dead = dict(ray_head, pid=_dead_pid())
    (tmp_path / "dead.json").write_text(json.dumps(dead))
    monkeypatch.setenv(RECORD_ENV, str(tmp_path / "dead.json"))
    rec, why = running_head()
    assert rec is None and "is not running" in why
    assert local_cpus(None, None) == os.cpu_count()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    time.sleep(0.1)
    return p.pid
