"""The cluster checks' rules on made-up nodes (the namespace cluster runs them for real: tests/test_cluster_nodes.py):
a request no node fits is refused naming the key, or waited for when Ray's autoscaler may add a node that fits;
the meta stage's CPUs; the waiting line repeated until a node that fits joins."""

import pytest

from orchestrator import cluster
from orchestrator.cluster import GB, Node, check_requests, meta_cpu_request, stage_requests, waiting_notes
from orchestrator.specs import Resources
from trainables.errors import InputError

NODES = [Node("head", "10.0.0.1", {"CPU": 0, "memory": 30 * GB}),
         Node("w1", "10.0.0.2", {"CPU": 1, "memory": 8 * GB}),
         Node("w2", "10.0.0.3", {"CPU": 1, "memory": 8 * GB})]


def where(loc):
    return f"grid.yaml:9 ({'.'.join(loc)})"


def test_a_request_no_node_fits_names_its_key_and_the_largest_node():
    res = Resources(cpus_per_worker=2)
    with pytest.raises(InputError) as e:
        check_requests(stage_requests(res, where, False, NODES), NODES, node_types=[])
    assert e.value.where == "grid.yaml:9 (resources.cpus_per_worker)"
    assert "a trial needs 2 CPUs on one node, but none of the 3 nodes has them" in e.value.message
    assert "the largest node (10.0.0.2) has 1 CPU and 8.0 GB" in e.value.message


def test_resources_that_fit_apart_but_not_together_name_every_key():
    res = Resources(cpus_per_worker=1, memory_gb=20)  # the head has the memory, the workers the CPU
    with pytest.raises(InputError) as e:
        check_requests(stage_requests(res, where, False, NODES), NODES, node_types=[])
    assert "1 CPU and 20.0 GB" in e.value.message
    res = Resources(cpus_per_worker=1, memory_gb=40)
    with pytest.raises(InputError) as e:
        check_requests(stage_requests(res, where, False, NODES), NODES, node_types=[])
    assert e.value.where == "grid.yaml:9 (resources.memory_gb)"


def test_what_the_autoscaler_may_add_is_waited_for_and_said(monkeypatch):
    res = Resources(cpus_per_worker=2)
    waiting = check_requests(stage_requests(res, where, False, NODES), NODES, node_types=[{"CPU": 8, "GPU": 1}])
    assert [w.line for w in waiting] == ["a trial: waiting for a node with 2 CPUs: none of the 3 nodes has them; the "
                                         "autoscaler may add one"]
    with pytest.raises(InputError):  # a node type that does not fit either: refused
        check_requests(stage_requests(res, where, False, NODES), NODES, node_types=[{"CPU": 1}])
    nodes = list(NODES)
    monkeypatch.setattr(cluster, "alive_nodes", lambda: nodes)
    said = []
    with waiting_notes(waiting, said.append, every_s=0.05):
        import time

        deadline = time.monotonic() + 5
        while len(said) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        nodes.append(Node("w3", "10.0.0.4", {"CPU": 8, "memory": 32 * GB}))  # the autoscaler's node joins
        time.sleep(0.3)
        n = len(said)
        time.sleep(0.3)
    assert n >= 2 and len(said) == n, said  # said repeatedly, and no more once a node fits
    assert said[0].startswith("a trial: waiting for a node with 2 CPUs") and said[0].endswith(" s)")


def test_the_meta_stage_takes_what_one_node_has_unless_stated():
    res = Resources(cpus_per_worker=1, max_concurrent=4)  # the grid uses 4 CPUs at once
    assert meta_cpu_request(res, None, NODES) == 1  # the largest node has 1
    assert meta_cpu_request(res, 2, None) == 2  # a local instance of 2 CPUs
    stated = Resources(cpus_per_worker=1, max_concurrent=4, meta_cpus=3)
    assert meta_cpu_request(stated, None, NODES) == 3
    with pytest.raises(InputError) as e:
        check_requests(stage_requests(stated, where, True, NODES), NODES, node_types=[])
    assert e.value.where == "grid.yaml:9 (resources.meta_cpus)" and "meta-training φ needs 3 CPUs" in e.value.message
