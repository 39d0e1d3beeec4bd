"""A real two-node Ray cluster on this machine: a head and a second node (separate raylet processes),
every Ray server bound to 127.0.0.1 and the dashboard / job server on 127.0.0.1 too. A grid runs through it
with --address from this process, and again through `ray job submit`; in both, the trials run on both nodes.
A local `taalm` Ray instance also listens on loopback only."""

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port_number

pytestmark = pytest.mark.integration  # starts Ray / MLflow servers

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "ablations" / "smoke_tiny.yaml"
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}




def listening(pids) -> set[tuple[str, int]]:
    import psutil

    out = set()
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        out |= {(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}
    return out


def ray_processes() -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process().children(recursive=True)]


@pytest.fixture(scope="module")
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    from orchestrator.local_ray import _keep_loopback

    _keep_loopback()
    dashboard = free_port_number()
    # each node's dashboard agent on a free port: Ray's default (52365) may be taken by another Ray instance on
    # the machine (then the head's agent cannot serve, and `ray job submit` answers "No available agent")
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": dashboard,
        "dashboard_agent_listen_port": free_port_number()})
    cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1", dashboard_agent_listen_port=free_port_number())
    try:
        cluster.wait_for_nodes()
        nodes = {n.node_id for n in cluster.list_all_nodes()}
        assert len(nodes) == 2
        yield cluster, nodes, f"http://127.0.0.1:{dashboard}"
    finally:
        ray.shutdown()
        cluster.shutdown()


def _node_ids(r) -> list[str]:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(r["tracking_uri"])
    exp = c.get_experiment_by_name(r["experiment"])
    runs = c.search_runs([exp.experiment_id], "tags.`taalm.role` = 'trial'")
    assert [t.info.status for t in runs] == ["FINISHED"] * len(runs) and len(runs) == 2
    return [t.data.tags.get("taalm.node_id") for t in runs]


def test_local_instance_listens_on_loopback_only():
    import ray

    from orchestrator.local_ray import init_ray

    assert not ray.is_initialized()  # (run before the module's cluster starts, and separate from it anyway)
    before = set(ray_processes())
    init_ray(None, num_cpus=1)
    try:
        assert ray.nodes()[0]["NodeManagerAddress"] == "127.0.0.1"
        socks = listening([p for p in ray_processes() if p not in before])
        assert len(socks) >= 3 and {ip for ip, _ in socks} <= LOOPBACK, socks
    finally:
        ray.shutdown()


def test_grid_runs_on_both_nodes_with_address(two_nodes, tmp_path):
    import ray

    from orchestrator.ablation import run_ablation

    cluster, nodes, _ = two_nodes
    try:
        r = run_ablation(SMOKE, ["name=two_nodes", "resources.max_concurrent=2"], out_root=tmp_path,
                         address=cluster.address)
    finally:
        ray.shutdown()
    assert r["failed"] == 0
    # each trial's single worker needs the only CPU of a node: two at once must use both nodes
    assert set(_node_ids(r)) == nodes


def test_grid_submitted_with_ray_job_submit(two_nodes, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    _, nodes, dashboard = two_nodes
    bin_dir = Path(sys.executable).parent
    job_id = "taalm-two-nodes"
    cmd = [str(bin_dir / "ray"), "job", "submit", "--address", dashboard, "--submission-id", job_id, "--",
           str(bin_dir / "taalm"), "ablate", str(SMOKE), "--address", "auto", "--out", str(tmp_path),
           "--set", "name=job_submit", "--set", "resources.max_concurrent=2"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert JobSubmissionClient(dashboard).get_job_status(job_id) == JobStatus.SUCCEEDED
    assert "2 trials, 0 failed" in p.stdout
    r = {"tracking_uri": f"sqlite:///{tmp_path / 'job_submit' / 'mlflow.db'}", "experiment": "job_submit"}
    assert set(_node_ids(r)) == nodes


def test_the_cluster_listens_on_loopback_only(two_nodes):
    _, _, dashboard = two_nodes
    socks = listening(ray_processes())
    assert len(socks) >= 6  # GCS, two raylets (2 ports each), dashboard, agents
    assert {ip for ip, _ in socks} <= LOOPBACK, socks
    assert ("127.0.0.1", int(dashboard.rsplit(":", 1)[1])) in socks
