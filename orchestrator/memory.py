"""How much memory a trial needs at its peak, and how many trials fit at once.

A documented formula, not a measurement at start-up (a measuring run would cost a model load per study); its
error against measured peaks is in docs/RELIABILITY.md ("Memory that fits") and bench/results/memory_estimate.json
(``bench/memory_estimate.py`` measures the peak resident memory of real runs and compares).

For a Llama-architecture θ (hidden size h, L layers, MLP width m, vocabulary V, n_h attention heads, parameters P,
b bytes per value of ``model.dtype``), a continual / TemporalWiki trial at batch B and length T holds at its peak

    R                                    the process: Python, torch, transformers, Ray's worker (RUNTIME_GB, measured)
  + P·b · copies                         θ (twice while a model loads from disk: the file's tensors and the model's);
                                         + the warm process's kept copy (lean trials, when P·b <= keep_weights_gb);
                                         + a frozen copy when a method needs the initial θ and the parameterisation
                                         keeps one (full, kadapter); + φ's body (its first k layers) for TAALM
  + P_train·b · (1 + 1 + s)              trainable weights' gradient, one optimiser temporary, s states (AdamW 2, SGD 0)
  + max(train step, evaluation)          the larger of
        B·T·L·(A·h + M·m)·b + 2·B·n_h·T²·L·b     activations kept for the backward pass (eager attention's
                                                   scores and probabilities are the T² term)
      + B·T·V·4·3                                logits, their log-softmax and its gradient, float32
    and E·T_e·V·4·2                              the evaluation batch's logits (E = eval.batch_size, T_e = min(T, 64))

with A = 16 and M = 4 (tensors of width h and m each layer keeps: norms, q/k/v, rotary, attention output,
residuals; gate, up, activation, product). Meta-training (the stage runs alone) adds the second-order graph:
per vmapped example (G = meta.vmap_chunk or meta.batch_size) and per differentiable inner step, θ's trainable
parameters three times (θ', its gradient, the update) and the activations of one document twice (forward and
the graph of its gradient), plus φ's activations, plus a fixed cost (META_FIXED_GB, vmapped or sequential) fitted
to measurements on `tiny` only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .gpu_plan import GB, gpu_bytes
RUNTIME_GB = 0.45  # measured: bench/results/memory_estimate.json cases.ray_runtime (a Ray worker that imported what a trial imports, before it loads a model)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
A_H, A_M = 16, 4
# meta-training: a fixed cost on top of the formula's graph, fitted to `tiny`'s measured peaks (bench/memory_estimate.py:
# 2.5-2.6 GB vmapped whatever the meta-batch, length or validation batch; 1.1 GB one example at a time), not
# measured on a larger model: the stage runs alone, the figure decides what Ray reserves for it and the warning
META_FIXED_GB = {"vmap": 2.05, "sequential": 0.6}
# TemporalWiki's diff set: building its Arrow cache (one streamed batch, 0.17-0.18 GB measured) or the pages of the
TW_DATA_GB = 0.2  # last twdata.REMAP_EVERY batches read from it (<= 0.03 GB): bench/temporalwiki_data.py

SMOLLM2_135M = {"hidden_size": 576, "num_hidden_layers": 30, "intermediate_size": 1536, "vocab_size": 49152,
                "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True}
TOKENIZER_VOCAB = 49152  # SmolLM2's tokenizer (tiny uses it too)


@dataclass
class Arch:
    h: int
    layers: int
    m: int
    vocab: int
    heads: int
    kv_heads: int
    tied: bool = True

    @property
    def h_kv(self) -> int:
        return self.h * self.kv_heads // self.heads

    def layer_params(self) -> int:
        h, m = self.h, self.m
        return 2 * h * h + 2 * h * self.h_kv + 3 * h * m + 2 * h

    def params(self, layers: Optional[int] = None) -> int:
        n = self.layers if layers is None else min(layers, self.layers)
        embed = self.vocab * self.h
        return embed + n * self.layer_params() + self.h + (0 if self.tied else embed)

    def lora_params(self, r: int) -> int:
        """LoRA on every linear layer of the body (peft's all-linear: the output head excluded)."""
        h, m, kv = self.h, self.m, self.h_kv
        per_layer = r * ((h + h) + (h + kv) + (h + kv) + (h + h) + (h + m) + (h + m) + (m + h))
        return self.layers * per_layer


def arch_of(model: dict) -> Optional[Arch]:
    """θ's architecture from its model config (``model`` section): tiny's numbers, SmolLM2-135M's, or a local
    directory's config.json; None when unknown (a hub id not on disk)."""
    name = model.get("name", "tiny")
    if name == "tiny":
        t = model.get("tiny") or {}
        return Arch(t.get("hidden_size", 64), t.get("num_layers", 2), t.get("intermediate_size", 128), TOKENIZER_VOCAB,
                    t.get("num_heads", 4), t.get("num_kv_heads", 2))
    if name == "smollm2-135m":
        c = SMOLLM2_135M
    else:
        src = name[3:] if name.startswith("hf:") else name
        f = Path(src).expanduser() / "config.json"
        try:
            c = json.loads(f.read_text())
        except (OSError, ValueError):
            return None
    try:
        return Arch(c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["vocab_size"],
                    c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"],
                    bool(c.get("tie_word_embeddings", False)))
    except (KeyError, TypeError):
        return None


def _trainable(arch: Arch, params: dict) -> tuple[int, bool]:
    """(trainable parameters, whether a frozen copy backs the reference model)."""
    kind = params.get("kind", "lora")
    if kind in ("lora", "qlora"):
        return arch.lora_params(int(params.get("r", 64))), False
    if kind == "kadapter":
        k = params.get("kadapter") or {}
        n = len(k.get("layers") or []) or 3
        return n * 2 * arch.h * int(k.get("bottleneck", 64)), True
    return arch.params(), True


def _schemes(cfg: dict) -> list[str]:
    s = (cfg.get("weighting") or {}).get("scheme", "uniform")
    names = s if isinstance(s, list) else str(s).split("*")
    return [n.strip() for n in names]


def _needs_initial_theta(cfg: dict) -> bool:
    w = cfg.get("weighting") or {}
    schemes = _schemes(cfg)
    rho1 = "rho1" in schemes or ((w.get("random") or {}).get("match") == "rho1")
    return (rho1 and (w.get("rho1") or {}).get("reference", "initial") == "initial") or \
        (cfg.get("replay") or {}).get("kind") in ("gere", "seekr")


def _phi_layers(cfg: dict, meta_cfg: Optional[dict]) -> Optional[int]:
    phi = ((cfg.get("weighting") or {}).get("train_attention") or {}).get("phi")
    if phi:
        try:
            return (json.loads((Path(phi) / "phi.json").read_text()).get("phi") or {}).get("num_layers")
        except (OSError, ValueError, AttributeError):
            pass
    if meta_cfg:
        return (meta_cfg.get("phi") or {}).get("num_layers")
    return None


def _activations(arch: Arch, batch: int, length: int, b: int) -> float:
    per_layer = batch * length * (A_H * arch.h + A_M * arch.m) * b + 2 * batch * arch.heads * length ** 2 * b
    return arch.layers * per_layer


def _logits(arch: Arch, batch: int, length: int, copies: int) -> float:
    return batch * length * arch.vocab * 4 * copies


@dataclass
class Estimate:
    """A trial's peak memory (bytes) and its parts, for the message and the docs."""

    total: float
    parts: dict
    gpu: Optional[float] = None  # bytes on the trial's GPU when it runs on one (orchestrator/gpu_plan.py)

    @property
    def gb(self) -> float:
        return self.total / GB

    def describe(self) -> str:
        return ", ".join(f"{k} {v / GB:.2f}" for k, v in self.parts.items() if v) + " GB"


def estimate_trial(cfg: dict, lean: bool = True, keep_weights_gb: float = 2.0,
                   meta_cfg: Optional[dict] = None) -> Optional[Estimate]:
    """Peak memory of one continual / TemporalWiki trial (one worker) with run config ``cfg`` (a dict), or None when
    θ's architecture is unknown."""
    arch = arch_of(cfg.get("model") or {})
    if arch is None:
        return None
    b = DTYPE_BYTES.get((cfg.get("model") or {}).get("dtype", "float32"), 4)
    train, ev = cfg.get("train") or {}, cfg.get("eval") or {}
    weights = arch.params() * b
    copies = 1.0 if (cfg.get("model") or {}).get("name", "tiny") == "tiny" else 2.0  # loading: file and model at once
    if lean and weights <= keep_weights_gb * GB:
        copies += 1  # the warm process keeps the base weights loaded for the next trial
    host_only = copies - 1  # the file's copy and the kept one are in host memory, never on a GPU
    n_train, frozen = _trainable(arch, cfg.get("params") or {})
    if _needs_initial_theta(cfg) and frozen:
        copies += 1
    if "train_attention" in _schemes(cfg):
        k = _phi_layers(cfg, meta_cfg)
        copies += arch.params(k) / arch.params()
    states = 2 if train.get("optimizer", "adamw") == "adamw" else 0
    reg = (cfg.get("regularizer") or {}).get("kind", "none")
    trainable = n_train * b * (2 + states + (2 if reg in ("ewc", "recadam") else 0))
    B, T = int(train.get("batch_size", 8)), int(train.get("max_length", 512))
    replay = cfg.get("replay") or {}
    if replay.get("kind", "none") != "none":
        B = int(B * (1 + float(replay.get("ratio", 1.0) or 0)))  # replayed documents share the step
    step = _activations(arch, B, T, b) + _logits(arch, B, T, 3)
    evaluation = _logits(arch, int(ev.get("batch_size", 32)), min(T, 64), 2)
    parts = {"runtime": RUNTIME_GB * GB, "weights": weights * copies, "trainable state": trainable,
             "activations": max(step, evaluation), "diff-set cache": TW_DATA_GB * GB if cfg.get("temporalwiki") else 0}
    return Estimate(sum(parts.values()), parts,
                    gpu_bytes(weights * (copies - host_only), trainable, max(step, evaluation)))


def estimate_meta(meta_cfg: dict) -> Optional[Estimate]:
    """Peak memory of a meta-training trial (θ, φ and the second-order graph of a vmapped group of examples)."""
    arch = arch_of(meta_cfg.get("model") or {})
    if arch is None:
        return None
    b = DTYPE_BYTES.get((meta_cfg.get("model") or {}).get("dtype", "float32"), 4)
    m = meta_cfg.get("meta") or {}
    phi = meta_cfg.get("phi") or {}
    k = phi.get("num_layers")
    n_train, frozen = _trainable(arch, meta_cfg.get("params") or {"kind": "lora", "r": 8})
    n_phi, _ = _trainable(Arch(arch.h, k or arch.layers, arch.m, arch.vocab, arch.heads, arch.kv_heads),
                          phi.get("params") or {"kind": "lora", "r": 8})
    T = int(m.get("max_length", 512))
    G = int(m.get("vmap_chunk") or m.get("batch_size", 16)) if m.get("batching", "vmap") == "vmap" else 1
    steps = int(m.get("inner_steps", 1))
    loaded = 1 if (meta_cfg.get("model") or {}).get("name", "tiny") == "tiny" else 2
    weights = arch.params() * b * (loaded + (1 if frozen else 0)) + arch.params(k) * b
    phi_state = n_phi * b * 4  # φ, its gradient, AdamW's two states
    phi_arch = Arch(arch.h, k or arch.layers, arch.m, arch.vocab, arch.heads, arch.kv_heads)
    per_example = steps * (3 * n_train * b + 2 * (_activations(arch, 1, T, b) + _logits(arch, 1, T, 3))) \
        + _activations(phi_arch, 1, T, b)
    parts = {"runtime": RUNTIME_GB * GB, "weights": weights, "trainable state": phi_state,
             "second-order graph": G * per_example,
             "fixed (fitted)": META_FIXED_GB["vmap" if m.get("batching", "vmap") == "vmap" else "sequential"] * GB}
    on_gpu = sum(parts.values()) - parts["runtime"] - (loaded - 1) * arch.params() * b  # the file's copy: host
    return Estimate(sum(parts.values()), parts, gpu_bytes(on_gpu, 0.0, 0.0))


def release_freed_memory() -> None:
    """Give the memory a finished trial freed back to the operating system, so the next trial of a warm process
    starts from the process's real footprint.

    Tune runs each trial of a reused actor in a new thread; the memory glibc's allocator gave that trial's
    tensors stays with the process after they are freed and is not reused by the next trial's thread, so
    without this a warm process grew by about the size of a trial's working set per trial (SmolLM2-135M,
    LoRA r 16, batch 8: peak RSS 3.2 → 4.5 → 5.5 → 7.0 → 8.1 GB over five trials; Ray's memory monitor killed
    such a process in a Table 1 run). ``malloc_trim(0)`` after each trial: 3.2 GB for every trial. A no-op
    where the C library is not glibc."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
