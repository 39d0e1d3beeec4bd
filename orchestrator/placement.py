"""How many trials fit at once: counted node by node (host memory, CPUs, GPUs), never over memory added up.

A trial's workers each take ``cpus_per_worker`` CPUs, ``gpus_per_worker`` GPUs and the estimated (or stated)
memory from one node, so a node holds as many workers as the scarcest of the three allows there; the study runs
at most the sum over nodes of those, divided by the workers of a trial. A node without CPUs (a cluster's head kept
for the driver) holds none. The message names the nodes that hold workers, how many each."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from .gpu_plan import GB, gpu_bytes, gpu_fit, gpu_memory


@dataclass(frozen=True)
class Node:
    """What Ray lets trials reserve on one node."""

    name: str  # the node's address
    memory: float  # bytes of Ray's ``memory`` resource
    cpus: float = math.inf
    gpus: Optional[float] = None  # Ray's ``GPU`` resource; None: not known (then only the memory counts)


@dataclass
class Fit:
    asked: int
    fits: int  # trials at once that the nodes hold (>= 1: a trial too large still runs, alone)
    need_gb: float  # per worker
    source: str  # "estimated" | "resources.memory_gb"
    message: str
    request_gb: float  # what Ray's scheduler is told per worker (at most the largest node's memory)


def ray_nodes() -> list[Node]:
    """Every alive node of the Ray instance this process is attached to."""
    import ray

    return [Node(n.get("NodeManagerAddress") or n.get("NodeID", "?")[:8], n["Resources"].get("memory", 0.0),
                 n["Resources"].get("CPU", 0.0), n["Resources"].get("GPU", 0.0))
            for n in ray.nodes() if n.get("Alive")]


def machine_memory() -> float:
    import psutil

    return float(psutil.virtual_memory().total)


def _slots(node: Node, need: float, cpus: float, gpus: float) -> int:
    """Workers ``node`` holds at once: the scarcest of its memory, its CPUs and (when a worker takes some) its GPUs."""
    n = int(node.memory // need)
    if cpus > 0 and math.isfinite(node.cpus):
        n = min(n, int(node.cpus // cpus + 1e-9))
    if gpus > 0 and node.gpus is not None:
        n = min(n, int(node.gpus // gpus + 1e-9))
    return n


def plan(need_bytes: Optional[float], stated_gb: Optional[float], asked: int, workers: int,
         nodes: Sequence[Union[Node, float]], machine: float, gpu: Optional[tuple[int, float]] = None,
         gpus_per_worker: float = 0.0, gpu_need_bytes: Optional[float] = None, cpus_per_worker: float = 0.0) -> Fit:
    """How many trials of ``workers`` workers, each needing ``need_bytes`` (or the user's ``stated_gb``) and
    ``cpus_per_worker`` / ``gpus_per_worker``, fit on ``nodes`` (:class:`Node`, or bytes of memory for nodes known
    by their memory only) and, when trials use GPUs, on ``gpu`` = (number of GPUs, bytes each, as this process
    sees them; None: unknown), each worker holding ``gpu_need_bytes`` there (:func:`orchestrator.gpu_plan.gpu_bytes`;
    None: the host need plus the CUDA context). Returns the concurrency to run at and the message saying why."""
    nodes = [n if isinstance(n, Node) else Node(f"node {i + 1}", float(n)) for i, n in enumerate(nodes)]
    source = "resources.memory_gb" if stated_gb else "estimated"
    need = stated_gb * GB if stated_gb else need_bytes
    if not need or not nodes:
        why = "memory per trial unknown (set resources.memory_gb)" if not need else "no node reports its memory"
        return Fit(asked, asked, 0.0, source, f"{asked} at a time; {why}", 0.0)
    slots = [_slots(n, need, cpus_per_worker, gpus_per_worker) for n in nodes]
    fits = sum(slots) // max(1, workers)
    largest = max(n.memory for n in nodes)
    if len(nodes) == 1:
        where = f"{largest / GB:.1f} GB Ray holds for trials of this machine's {machine / GB:.1f} GB"
        if slots[0] < int(largest // need):  # the CPUs or GPUs, not the memory, are what run out
            n = nodes[0]
            where += (f" with its {n.cpus:g} CPU(s)" + (f" and {n.gpus:g} GPU(s)" if gpus_per_worker > 0 else "")
                      + f" ({cpus_per_worker:g} CPU(s)" + (f", {gpus_per_worker:g} GPU(s)" if gpus_per_worker else "")
                      + " per worker)")
    else:
        held = [f"{s} on {n.name}" for n, s in zip(nodes, slots) if s]
        where = (f"{len(held)} of {len(nodes)} nodes, worker slots " + ", ".join(held) if held else
                 f"any of {len(nodes)} nodes (the largest holds {largest / GB:.1f} GB for trials)")
        if len(held) == len(nodes):
            where = f"{len(nodes)} nodes, worker slots " + ", ".join(held)
        where = "on " + where
    what = f"a trial needs {need / GB:.2f} GB ({source})" if workers == 1 else \
        f"a trial's {workers} workers need {need / GB:.2f} GB each ({source})"
    gfit, gpu_note = gpu_fit(gpu_need_bytes or gpu_bytes(need, 0.0, 0.0), gpu, gpus_per_worker, workers)
    if fits < 1:
        if any(n.memory >= need for n in nodes):  # the memory is there, the CPUs or GPUs beside it are not
            too_much = (f"{what}, {cpus_per_worker:g} CPU(s) and {gpus_per_worker:g} GPU(s) per worker: no node has "
                        f"them all at once ({', '.join(f'{n.name}: {n.cpus:g} CPUs, {n.memory / GB:.1f} GB' for n in nodes)})")
        else:
            too_much = f"{what}, more than {where if len(nodes) == 1 else f'the largest node holds ({largest / GB:.1f} GB)'}"
        return Fit(asked, 1, need / GB, source,
                   f"{too_much}: one at a time, and Ray's memory monitor may stop it{gpu_note}", min(need, largest) / GB)
    if gfit is not None and gfit < min(fits, asked):  # the GPUs hold fewer than the host memory
        n = max(1, gfit)  # none: more GPUs asked for than there are (Ray waits for them); a trial at a time
        msg = f"{asked} at a time asked, {n} fit{'s' if n == 1 else ''} on the GPUs: {what}{gpu_note}"
        return Fit(asked, n, need / GB, source, msg, need / GB)
    inside = "in " if len(nodes) == 1 else ""
    if fits < asked:
        msg = f"{asked} at a time asked, {fits} fit{'s' if fits == 1 else ''} {inside}{where}: {what}{gpu_note}"
    else:
        msg = f"{what}; {asked} at a time (up to {fits} fit {inside}{where}){gpu_note}"
    return Fit(asked, min(asked, fits), need / GB, source, msg, need / GB)


def plan_stage(resources, need) -> Fit:
    """:func:`plan` for a study stage (``need``: its :class:`orchestrator.memory.Estimate`, or None) on the Ray
    instance this process is attached to."""
    gpu = gpu_memory() if resources.gpus_per_worker > 0 else None
    return plan(need.total if need else None, resources.memory_gb, resources.max_concurrent, resources.workers,
                ray_nodes(), machine_memory(), gpu, resources.gpus_per_worker, need.gpu if need else None,
                resources.cpus_per_worker)


def check_stated(resources, where: str, local: bool) -> None:
    """Bad input before anything starts: a stated ``resources.memory_gb`` more than this machine's memory, on the
    local instance a study would start (a cluster's nodes are known once attached: there it is planned, not
    refused)."""
    from trainables.errors import InputError

    if resources.memory_gb and local:
        total = machine_memory()
        if resources.memory_gb * GB > total:
            raise InputError(where, f"{resources.memory_gb:g} GB per trial worker, more than this machine's "
                                    f"{total / GB:.1f} GB (Ray lets trials reserve about 70 % of the free memory)")
