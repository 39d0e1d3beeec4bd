"""The GPU side of the memory plan (orchestrator/memory.py): what one trial worker holds on its GPU, and how many
trials the GPUs take at once.

On its GPU a worker holds θ's weights once (the file's copy while loading and the warm process's kept copy stay in
host memory), a frozen copy and φ's body where the trial has them, the trainable state and the larger of the
training step's activations and the evaluation batch, plus the CUDA context and the libraries' workspaces that
every CUDA process allocates before its first tensor (``CUDA_CONTEXT_GB``). A fractional ``gpus_per_worker`` packs
trials on one GPU, and each trial's process is capped at its share of the GPU's memory
(``torch.cuda.set_per_process_memory_fraction``, orchestrator/ray_trainables.py): so a trial fits when its need is
within its share, and the GPUs hold as many trials as both Ray's count of shares and their memory allow.
"""

from __future__ import annotations

import math
from typing import Optional

GB = 2 ** 30
# per CUDA process before its first tensor: the context, cuBLAS / cuDNN workspaces and the caching allocator's first
# blocks (the usual ~0.5 GB of a CUDA 12/13 process on an H100/H200; not measured here, no GPU in the sessions
# that built this)
CUDA_CONTEXT_GB = 0.5


def gpu_bytes(weights: float, trainable_state: float, activations: float) -> float:
    """Bytes a trial worker holds on its GPU: θ's device copies (``weights``: the bytes of every copy on the GPU),
    its trainable state, the step's or the evaluation's activations, and the CUDA context."""
    return weights + trainable_state + activations + CUDA_CONTEXT_GB * GB


def gpu_fit(need: float, gpu: Optional[tuple[int, float]], share: float, workers: int) -> tuple[Optional[int], str]:
    """How many trials of ``workers`` workers, each holding ``need`` bytes on its GPU (:func:`gpu_bytes`), the
    GPUs take at once with ``share`` = ``resources.gpus_per_worker``; ``gpu`` = (number of GPUs, bytes each), None
    when unknown. Returns (trials, or None when the GPUs do not limit them; the note for the plan's message).

    A trial larger than a GPU runs alone (1), said: the estimate is a formula, and ``train.micro_batch_size`` /
    ``train.oom: halve_batch`` may still make it fit. A packed trial larger than its share is said with the share it
    needs (its process is capped at its share)."""
    if share <= 0:
        return None, ""
    if gpu is None:
        return None, "; GPU memory unknown here (no CUDA in this process): not capped by it"
    n_gpu, per_gpu = gpu
    what = f"a trial worker needs {need / GB:.2f} GB of GPU memory (CUDA context {CUDA_CONTEXT_GB:g} GB included)"
    if need > per_gpu:
        return 1, (f"; {what}, more than a GPU's {per_gpu / GB:.1f} GB: one at a time, and it may run out of GPU "
                   "memory (train.micro_batch_size, train.oom: halve_batch)")
    if share < 1:
        slots = int(math.floor(1 / share + 1e-9))  # Ray's count: trials packed on one GPU
        per = min(slots, int(per_gpu // need))
        fits = n_gpu * per // max(1, workers)
        note = f"; {fits} fit on {n_gpu} GPU(s) of {per_gpu / GB:.1f} GB ({what}"
        room = share * per_gpu
        if need > room:
            wanted = math.ceil(need / per_gpu * 1000) / 1000
            note += (f", more than its share's {room / GB:.1f} GB ({share:g} of a GPU: its process's cap); "
                     f"resources.gpus_per_worker >= {wanted:g} gives it room")
        return fits, note + ")"
    fits = int(n_gpu // share) // max(1, workers)
    if fits < 1:
        return 0, f"; {share:g} GPU(s) per worker × {workers} asked, {n_gpu} here: Ray cannot place a trial"
    return fits, f"; {fits} fit on {n_gpu} GPU(s) of {per_gpu / GB:.1f} GB, {share:g} per worker ({what})"


def gpu_memory() -> Optional[tuple[int, float]]:
    """(number of CUDA devices, bytes of the first) in this process, or None when CUDA is not available here."""
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count():
            return torch.cuda.device_count(), float(torch.cuda.get_device_properties(0).total_memory)
    except Exception:  # noqa: BLE001 (a broken CUDA install: unknown)
        return None
    return None


# ---- a trial process on its GPU (orchestrator/ray_trainables.py) -------------------------------------------------

def local_cuda(device: str, gpu_ids: list[str], visible: Optional[str]) -> tuple[str, Optional[str]]:
    """The CUDA device a trial process uses, as this process numbers it, for the config's ``device`` (auto, cuda or
    cuda:N) and the GPU(s) Ray assigned (``gpu_ids``; Ray sets ``CUDA_VISIBLE_DEVICES``, ``visible``, so that a
    Tune trial's GPU is its cuda:0 and a Ray Train worker's is its place among the node's workers' GPUs). ``cuda:N``
    names a GPU of the machine: the assigned one it is, or the first assigned one, said (a note) when Ray assigned
    another (passing cuda:N through would fail, or use another trial's GPU)."""
    order = [v.strip() for v in (visible or "").split(",") if v.strip()] or list(gpu_ids)

    def index(gpu: str) -> int:
        return order.index(gpu) if gpu in order else 0

    first = index(gpu_ids[0]) if gpu_ids else 0
    if not device.startswith("cuda:"):
        return ("cuda" if first == 0 else f"cuda:{first}"), None
    asked = device.split(":", 1)[1]
    if asked in gpu_ids:
        return f"cuda:{index(asked)}", None
    return f"cuda:{first}", (f"device {device} in the config, but Ray assigned GPU {','.join(gpu_ids) or '?'} to this "
                             f"trial: running on it (cuda:{first} in this process)")


def memory_fraction(share: float, total_bytes: float) -> Optional[float]:
    """The fraction of the GPU's memory a packed trial's allocator may take: its share, less the CUDA context that
    every process holds outside the allocator (so packed trials' contexts fit too); None for a whole GPU."""
    if not 0 < share < 1:
        return None
    return max(0.01, share - CUDA_CONTEXT_GB * GB / total_bytes)


def claim_gpu(device: str, share: float) -> dict:
    """Cap this process's CUDA allocator at its share of the GPU (:func:`memory_fraction`; a packed trial then
    fails with its own out-of-memory error instead of taking its neighbours' memory); what to record."""
    import torch

    index = torch.device(device).index or 0
    fraction = memory_fraction(share, float(torch.cuda.get_device_properties(index).total_memory))
    # a whole GPU: no cap (1.0 also lifts an earlier trial's, in a reused process)
    torch.cuda.set_per_process_memory_fraction(fraction or 1.0, index)
    return {"gpu_memory_fraction": round(fraction, 4)} if fraction else {}


def release_gpu() -> None:
    """Give the CUDA memory a finished trial's tensors held back to the driver (a reused trial process would keep it
    reserved in PyTorch's cache, out of the reach of the trials packed beside it)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
