"""What the bench/ scripts share: timing that is right on a GPU (synchronised around the timed region), peak memory
of the device (CUDA: torch.cuda.max_memory_allocated; CPU: the process's peak RSS), the device's peak FLOP/s
(measured with a large matmul in the same run, and the datasheet figure for known GPUs), the FLOP count of a
training step of a causal LM, and the machine's description."""

from __future__ import annotations

import os
import platform
import resource
import time
from contextlib import contextmanager
from typing import Optional

import torch

# dense peak FLOP/s from the vendors' datasheets (no sparsity), by device-name fragment and dtype
DATASHEET = {"H200": {"bf16": 989e12, "fp32": 67e12, "tf32": 494e12},
             "H100": {"bf16": 989e12, "fp32": 67e12, "tf32": 494e12},
             "A100": {"bf16": 312e12, "fp32": 19.5e12, "tf32": 156e12}}


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def timed(device, out: dict, key: str = "seconds"):
    """Wall time of the block, with the device's queued work finished before and after it."""
    synchronize(device)
    t0 = time.perf_counter()
    yield
    synchronize(device)
    out[key] = time.perf_counter() - t0


def reset_peak_memory(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device) -> dict:
    """CUDA: the allocator's peak since the last reset; CPU: the process's peak RSS (all of it, since start)."""
    if torch.device(device).type == "cuda":
        return {"gpu_peak_allocated_mb": torch.cuda.max_memory_allocated(device) / 2 ** 20,
                "gpu_peak_reserved_mb": torch.cuda.max_memory_reserved(device) / 2 ** 20}
    return {"process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def matmul_peak(device, dtype: torch.dtype = torch.float32, n: Optional[int] = None, repeats: int = 5) -> float:
    """The device's attainable dense FLOP/s: the best of ``repeats`` n×n×n matmuls (2n³ FLOPs each)."""
    n = n or (8192 if torch.device(device).type == "cuda" else 1536)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        out: dict = {}
        with timed(device, out):
            a @ b
        best = min(best, out["seconds"])
    return 2 * n ** 3 / best


def datasheet_peak(device, precision: str) -> Optional[dict]:
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for frag, peaks in DATASHEET.items():
        if frag in name:
            key = "bf16" if precision == "bf16" else "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"
            return {"device": name, "dtype": key, "flops": peaks[key]}
    return None


def train_step_flops(model: torch.nn.Module, trainable: dict, tokens: int, context: int) -> dict:
    """FLOPs of one training step over ``tokens`` real tokens (the usual accounting, Kaplan et al. 2020): forward
    2·N per token, backward 2·N (activation gradients, needed through every layer) + 2·N_w (weight gradients of the
    N_w parameters that train), N = the parameters that multiply (embeddings' lookup excluded, the LM head
    included); attention adds 4·layers·context·d_model per token forward, twice that backward."""
    cfg = getattr(model, "config", None)
    n_mult = 0
    for name, p in model.named_parameters():
        if p.dim() >= 2 and "embed_tokens" not in name and "wte" not in name:
            n_mult += p.numel()
    tied = getattr(cfg, "tie_word_embeddings", False)
    if tied:  # the head reuses the embedding matrix: it multiplies too
        emb = model.get_input_embeddings().weight
        n_mult += emb.numel()
    n_train = sum(p.numel() for p in trainable.values())
    layers = getattr(cfg, "num_hidden_layers", 0) or 0
    d = getattr(cfg, "hidden_size", 0) or 0
    attn = 4 * layers * context * d
    per_token = 2 * n_mult + 2 * n_mult + 2 * n_train + 3 * attn
    return {"flops": per_token * tokens, "per_token": per_token, "multiplying_params": n_mult,
            "trainable_params": n_train, "formula": "tokens x (4 N + 2 N_trainable + 12 layers context d)"}


def machine(device) -> dict:
    d = torch.device(device)
    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "device": str(d)}
    if d.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(d), cuda=torch.version.cuda)
    return info
