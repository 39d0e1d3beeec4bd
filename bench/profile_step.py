"""Where one training step's time goes: torch.profiler over a few steps of trainables.step.train_step, the
operators grouped into what they are (matmuls, attention, elementwise, the optimizer, copies), as JSON.

    python bench/profile_step.py --case smollm2-135m/lora --out bench/results/profile_step.json

The share of each group is of the profiled CPU time (self time of every operator); "matmul" is the part the device's
peak FLOP/s can speed up, the rest is what a faster kernel cannot.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, matmul_peak, train_step_flops  # noqa: E402
from throughput import CASES  # noqa: E402

GROUPS = [("matmul", ("addmm", "mm", "bmm", "matmul", "linear", "baddbmm")),
          ("attention (softmax, masks)", ("softmax", "_softmax", "scaled_dot_product", "masked_fill", "where")),
          ("norm and activations", ("pow", "rsqrt", "mean", "silu", "mul", "add", "div", "neg", "cat", "sigmoid")),
          ("loss (log-softmax over the vocabulary)", ("log_softmax", "_log_softmax", "nll_loss", "cross_entropy")),
          ("optimizer", ("_foreach", "adamw", "lerp", "addcdiv", "addcmul", "sqrt")),
          ("copies and layout", ("copy_", "to", "_to_copy", "contiguous", "clone", "view", "reshape", "transpose",
                                 "permute", "expand", "index", "embedding", "fill_", "zero_", "empty", "t"))]


def group_of(name: str) -> str:
    base = name.split("::")[-1]
    for group, keys in GROUPS:
        if any(base == k or base.startswith(k + "_") for k in keys):
            return group
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default="smollm2-135m/lora", choices=list(CASES))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--attention", choices=["eager", "sdpa"], default="eager")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "profile_step.json")
    args = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile

    from trainables.checkpoint import write_json_atomic
    from trainables.config import load_config
    from trainables.continual import prepare_run
    from trainables.step import train_step

    n = args.batch_size
    cfg = load_config(None, CASES[args.case] + [f"train.batch_size={n}", f"train.max_length={args.max_length}",
                                                f"data.to_learn_size={n * (args.steps + 1)}", "data.ntf_size=1",
                                                "params.dropout=0.0", "device=cpu", f"model.attention={args.attention}"])
    setup = prepare_run(cfg)
    opt = setup.regularizer.optimizer(list(setup.trainable.values()))
    batches = [setup.docs[i:i + n] for i in range(0, len(setup.docs), n)]
    gen = torch.Generator().manual_seed(0)
    train_step(setup, opt, batches[0], gen, replay_round=0, step=0)  # warm-up
    import time

    tokens, t0 = 0, time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i, b in enumerate(batches[1:1 + args.steps]):
            tokens += train_step(setup, opt, b, gen, replay_round=0, step=i)[2]
    wall = time.perf_counter() - t0
    groups: dict[str, float] = {}
    ops = []
    total = 0.0
    for e in prof.key_averages():
        t = e.self_cpu_time_total / 1e6
        total += t
        groups[group_of(e.key)] = groups.get(group_of(e.key), 0.0) + t
        ops.append((t, e.key, e.count))
    ops.sort(reverse=True)
    context = max(len(d.input_ids) for d in setup.docs)
    flops = train_step_flops(setup.model, setup.trainable, tokens, context)
    peak = matmul_peak("cpu")
    out = {"case": args.case, "attention": args.attention, "steps": args.steps, "tokens": tokens,
           "wall_s_profiled": wall, "tokens_per_second_profiled": tokens / wall,
           "peak_flops_measured": peak, "flops": flops["flops"],
           "tokens_per_second_at_peak": tokens / (flops["flops"] / peak),
           "groups_share": {k: v / total for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
           "top_ops": [{"op": k, "self_s": t, "calls": c} for t, k, c in ops[:25]], "machine": machine("cpu")}
    write_json_atomic(args.out, out)
    print(json.dumps({k: v for k, v in out.items() if k not in ("top_ops", "machine")}, indent=1))


if __name__ == "__main__":
    main()
