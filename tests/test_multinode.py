"""A real two-node Ray cluster on this machine (a head and a second node: separate raylet processes,
loopback only); a grid submitted with --address runs its trials on both nodes."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_grid_runs_on_both_nodes_of_a_two_node_cluster(tmp_path):
    import ray
    from mlflow.tracking import MlflowClient
    from ray.cluster_utils import Cluster

    from orchestrator.study import run_ablation

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    try:
        cluster.wait_for_nodes()
        nodes = {n.node_id for n in cluster.list_all_nodes()}
        assert len(nodes) == 2
        r = run_ablation(ROOT / "ablations" / "smoke_tiny.yaml", ["name=two_nodes", "resources.max_concurrent=2"],
                         out_root=tmp_path, address=cluster.address)
        assert r["failed"] == 0
        c = MlflowClient(r["tracking_uri"])
        exp = c.get_experiment_by_name("two_nodes")
        ran_on = {t.data.tags.get("taalm.node_id") for t in c.search_runs([exp.experiment_id],
                                                                          "tags.`taalm.role` = 'trial'")}
        # each trial's single worker needs the only CPU of a node: two at once must use both nodes
        assert ran_on == nodes, (ran_on, nodes)
    finally:
        ray.shutdown()
        cluster.shutdown()
