"""The cluster as it is, checked before a stage starts: which nodes there are, whether each trial's resource
request fits one of them (or the autoscaler may add one), and whether every node sees the study's storage.

A request that fits no node would wait forever in Ray's queue, silently: it is refused (exit 2, naming the request,
the largest node and the key to change), or, where Ray's autoscaler may add a node that fits, said on the console
while the study waits. A storage path some node cannot see would fail at the first checkpoint minutes later: a
marker written by the driver is read back by a task on every node first.
"""

from __future__ import annotations

import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

from trainables.errors import InputError, first_line

from .storage import Storage

GB = 2 ** 30


@dataclass(frozen=True)
class Node:
    node_id: str
    ip: str
    resources: dict = field(default_factory=dict)  # Ray's totals: CPU, GPU, memory (bytes), ...

    @property
    def cpus(self) -> float:
        return float(self.resources.get("CPU", 0))

    @property
    def gpus(self) -> float:
        return float(self.resources.get("GPU", 0))

    @property
    def memory(self) -> float:
        return float(self.resources.get("memory", 0))


def alive_nodes() -> list[Node]:
    """The alive nodes of the Ray cluster this process is attached to."""
    import ray

    return [Node(n["NodeID"], n.get("NodeManagerAddress", "?"), dict(n.get("Resources") or {}))
            for n in ray.nodes() if n.get("Alive")]


def describe(bundle: dict) -> str:
    """'2 CPUs, 1 GPU and 3.0 GB' for a bundle of Ray resources."""
    parts = []
    if bundle.get("CPU"):
        parts.append(f"{bundle['CPU']:g} CPU{'' if bundle['CPU'] == 1 else 's'}")
    if bundle.get("GPU"):
        parts.append(f"{bundle['GPU']:g} GPU{'' if bundle['GPU'] == 1 else 's'}")
    if bundle.get("memory"):
        parts.append(f"{bundle['memory'] / GB:.1f} GB")
    if not parts:
        return "nothing"
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def fits(bundle: dict, resources: dict) -> bool:
    return all(float(resources.get(k, 0)) + 1e-9 >= float(v) for k, v in bundle.items() if v)


def _largest(nodes: list[Node]) -> str:
    if not nodes:
        return "no node is alive"
    n = max(nodes, key=lambda x: (x.gpus, x.cpus, x.memory))
    return f"the largest node ({n.ip}) has {describe({'CPU': n.cpus, 'GPU': n.gpus, 'memory': n.memory})}"


def autoscaler_node_types() -> Optional[list[dict]]:
    """The resources of each node type Ray's autoscaler may still add (from the cluster config the autoscaler
    publishes in the GCS; a private Ray API, checked by tests/test_install.py), or None when there is no
    autoscaler (a cluster started by hand, a local instance)."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 (no config, or an API Ray moved: treated as "cannot grow")
        return None
    if config is None or not config.node_group_configs:
        return None
    return [dict(g.resources) for g in config.node_group_configs if g.max_count != 0]


@dataclass
class Waiting:
    """A request no node has now, that a node the autoscaler may add would fit: the line the console repeats."""

    what: str
    bundle: dict
    line: str


KEYS = {"CPU": "resources.cpus_per_worker", "GPU": "resources.gpus_per_worker", "memory": "resources.memory_gb"}


def meta_cpu_request(resources, cpus: Optional[float], nodes: Optional[list[Node]] = None) -> float:
    """The CPUs of the meta stage's single worker: ``resources.meta_cpus`` when stated, else what the grid uses at
    once (cpus_per_worker x workers x max_concurrent: the stage runs alone), but no more than the local Ray
    instance (``cpus``) or the largest node of a cluster has (one worker runs on one node)."""
    if resources.meta_cpus is not None:
        return resources.meta_cpus
    share = resources.meta_cpu_count()
    if cpus is not None:
        return min(share, cpus)
    largest = max((n.cpus for n in nodes or []), default=0)
    return min(share, largest) if largest >= 1 else share


def stage_requests(resources, where, has_meta: bool, nodes: list[Node]) -> list[tuple[str, list[dict], dict]]:
    """What the study's stages ask Ray for, per trial: (what, its bundles, the key of each resource). A lean trial
    (and the meta stage) is one bundle on one node; a Ray Train trial is one bundle per worker."""
    mem = {"memory": resources.memory_gb * GB} if resources.memory_gb else {}
    gpu = {"GPU": resources.gpus_per_worker} if resources.gpus_per_worker else {}
    worker = {"CPU": resources.cpus_per_worker, **gpu, **mem}
    keys = {k: where(tuple(v.split("."))) for k, v in KEYS.items()}
    out = [("a trial", [worker] * (1 if resources.runs_lean() else resources.workers), keys)]
    if has_meta:
        key = where(("resources", "meta_cpus")) if resources.meta_cpus is not None else keys["CPU"]
        out.append(("meta-training φ", [{"CPU": meta_cpu_request(resources, None, nodes), **gpu}],
                    {**keys, "CPU": key}))
    return out


def check_requests(requests: list[tuple[str, list[dict], dict]], nodes: Optional[list[Node]] = None,
                   node_types: Optional[list[dict]] = None) -> list[Waiting]:
    """Each (what, bundles, keys) — a stage's trial, its resource bundles and the config key of each resource —
    checked against the nodes as they are: a bundle no node has, where the cluster cannot grow one, is an
    InputError naming the request, the largest node and the key to change; one the autoscaler may add a node for
    is returned as :class:`Waiting`. Defaults: the cluster this process is attached to."""
    nodes = alive_nodes() if nodes is None else nodes
    if node_types is None:
        node_types = autoscaler_node_types() or []
    waiting = []
    for what, bundles, keys in requests:
        for bundle in bundles:
            bundle = {k: v for k, v in bundle.items() if v}
            if any(fits(bundle, n.resources) for n in nodes):
                continue
            where = f"{len(nodes)} node{'' if len(nodes) == 1 else 's'}"
            if any(fits(bundle, t) for t in node_types):
                waiting.append(Waiting(what, bundle, f"{what}: waiting for a node with {describe(bundle)}: none of "
                                                     f"the {where} has them; the autoscaler may add one"))
                continue
            short = [k for k in bundle if not any(fits({k: bundle[k]}, n.resources) for n in nodes)] or list(bundle)
            key = " / ".join(keys.get(k, k) for k in short)
            raise InputError(key, f"{what} needs {describe(bundle)} on one node, but none of the {where} has them "
                                  f"({_largest(nodes)}) and the cluster cannot add one: lower it, or add a node "
                                  "that has them")
    return waiting


def still_waiting(waiting: list[Waiting]) -> list[Waiting]:
    """The requests of ``waiting`` that no alive node fits yet."""
    if not waiting:
        return []
    nodes = alive_nodes()
    return [w for w in waiting if not any(fits(w.bundle, n.resources) for n in nodes)]


def _read_marker(uri: str, parts: tuple) -> Optional[str]:
    """On a node: the marker's text, or why it cannot be read."""
    try:
        raw = Storage(uri).read_bytes(*parts)
    except Exception as e:  # noqa: BLE001 (any error is the answer: this node cannot read the storage)
        return f"error: {type(e).__name__}: {first_line(e)}"
    return None if raw is None else raw.decode(errors="replace")


def check_storage(storage: Storage, where: str = "storage", timeout_s: float = 60.0,
                  nodes: Optional[list[Node]] = None) -> list[Node]:
    """Every alive node reads a marker the driver writes into ``storage``: the nodes that cannot make the study
    fail before it starts (InputError naming ``where`` and the nodes, exit 2). Returns the nodes checked."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = alive_nodes() if nodes is None else nodes
    token = uuid.uuid4().hex
    parts = (".taalm", "storage-check", f"{token}.txt")
    try:
        storage.write_bytes(token.encode(), *parts)
    except Exception as e:  # noqa: BLE001
        raise InputError(where, f"{storage}: the driver cannot write there ({type(e).__name__}: "
                                f"{first_line(e, 300)})") from None
    try:
        task = ray.remote(num_cpus=0, max_retries=0)(_read_marker)
        refs = {task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n.node_id, soft=False),
                             name="taalm-storage-check").remote(storage.uri, parts): n for n in nodes}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        bad = []
        for ref, node in refs.items():
            if ref not in ready:
                bad.append(f"{node.ip} (no answer within {timeout_s:g} s)")
                continue
            try:
                got = ray.get(ref)
            except Exception as e:  # noqa: BLE001 (the node died meanwhile, a worker could not start)
                lines = [x for x in str(e).splitlines() if x.strip()]
                got = f"error: {lines[-1][:200] if lines else type(e).__name__}"
            if got != token:
                bad.append(f"{node.ip} ({'the marker is not there' if got is None else got})")
        for ref in refs:
            if ref not in ready:
                ray.cancel(ref, force=True)
    finally:
        try:
            storage.delete(*parts)
        except Exception:  # noqa: BLE001 (a marker left behind costs nothing)
            pass
    if bad:
        hint = ("a path on the driver's disk: on a cluster use a directory every node mounts at the same path "
                "(NFS), or a URI such as s3://BUCKET/PREFIX") if storage.local else \
            "check the credentials and endpoint every node has (AWS_* variables, the URI's options)"
        raise InputError(where, f"{storage}: {len(bad)} of {len(nodes)} nodes cannot see it: {', '.join(bad)}; "
                                f"{hint}")
    return nodes


@contextmanager
def waiting_notes(waiting: list[Waiting], note, every_s: float = 30.0):
    """While the block runs (a stage), the requests still waiting for a node are said at once and every
    ``every_s`` seconds, until a node that fits them joins."""
    if not waiting:
        yield
        return
    import threading

    stop, since = threading.Event(), time.monotonic()

    def loop():
        while True:
            try:
                left = still_waiting(waiting)
            except Exception:  # noqa: BLE001 (Ray going away at the end of the stage)
                return
            if not left:
                return
            note("; ".join(w.line for w in left) + f" ({time.monotonic() - since:.0f} s)")
            if stop.wait(every_s):
                return

    t = threading.Thread(target=loop, name="taalm-waiting", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()


def check_trial_cpus(res, cpus: Optional[int], where: str = "resources") -> None:
    """A trial that needs more CPUs than the local Ray instance has would wait forever: say so before anything
    starts."""
    if cpus is None:
        return
    need = res.cpus_per_worker * (1 if res.runs_lean() else res.workers)
    if need > cpus:
        raise InputError(f"{where}.cpus_per_worker",
                         f"a trial needs {need:g} CPUs ({res.workers} worker(s) x {res.cpus_per_worker:g}), but the "
                         f"local Ray instance has {cpus} (--num-cpus, or `taalm ray start --num-cpus`)")
    if res.meta_cpus is not None and res.meta_cpus > cpus:
        raise InputError(f"{where}.meta_cpus", f"{res.meta_cpus:g} CPUs asked for meta-training, but the local Ray "
                                               f"instance has {cpus}")
