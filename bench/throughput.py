"""Training throughput of the continual loop's weighted update (trainables.step.train_step: forward, weights,
backward, optimizer step), per model preset, on the CPU or a GPU.

    python bench/throughput.py                                   # CPU, every case, bench/results/throughput.json
    python bench/throughput.py --device cuda --precision bf16 --cases smollm2-135m/lora --out /tmp/t.json

Tokens are real (non-padding) predicted tokens. Timed regions are synchronised with the device. Reported per case:
tokens/s, seconds per step, the device's peak memory (CUDA: allocated; CPU: the process's peak RSS), and the
achieved FLOP/s as a fraction of the device's peak: the peak measured with a large matmul in the same run (and, on
a known GPU, the datasheet's), the FLOPs counted by bench/common.py: train_step_flops (stated in the JSON).
Timings are only comparable within one run on one machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (datasheet_peak, machine, matmul_peak, peak_memory_mb, reset_peak_memory, timed,  # noqa: E402
                    train_step_flops)

CASES = {
    "tiny/full": ["model.name=tiny", "params.kind=full", "data.split=release"],
    "tiny/lora": ["model.name=tiny", "params.kind=lora", "params.r=16", "data.split=release"],
    "smollm2-135m/lora": ["model.name=smollm2-135m", "params.kind=lora", "params.r=16", "data.split=tailored"],
    "smollm2-135m/full": ["model.name=smollm2-135m", "params.kind=full", "data.split=tailored"],
}


def measure(name: str, overrides: list[str], steps: int, batch_size: int, max_length: int, device: str,
            precision: str, attention: str, compile_model: bool = False) -> dict:
    from trainables.config import load_config
    from trainables.continual import prepare_run
    from trainables.step import train_step_stats

    cfg = load_config(None, overrides + [f"train.batch_size={batch_size}", f"train.max_length={max_length}",
                                         f"data.to_learn_size={batch_size * (steps + 2)}", "data.ntf_size=1",
                                         "weighting.scheme=uniform", "params.dropout=0.0", f"device={device}",
                                         f"train.precision={precision}", f"model.attention={attention}"])
    setup = prepare_run(cfg)
    if compile_model:  # a measurement only (not a training option yet): torch.compile of θ's forward
        setup.theta.model = torch.compile(setup.theta.model, dynamic=True)
    opt = setup.regularizer.optimizer(list(setup.trainable.values()))
    docs = setup.docs
    batches = [docs[i:i + batch_size] for i in range(0, len(docs), batch_size)]
    gen = torch.Generator().manual_seed(0)
    for i, b in enumerate(batches[:2]):  # warm-up
        train_step_stats(setup, opt, b, gen, replay_round=0, step=i)
    reset_peak_memory(setup.device)
    t = {}
    with timed(setup.device, t):  # as the loop runs them: no host sync inside a step (statistics stay on the device)
        stats = [train_step_stats(setup, opt, b, gen, replay_round=0, step=i)
                 for i, b in enumerate(batches[2:2 + steps])]
    tokens = int(sum(s[3] for s in torch.stack(stats).tolist()))
    context = max(len(d.input_ids) for d in docs)
    flops = train_step_flops(setup.model, setup.trainable, tokens, context)
    return {"case": name, "steps": steps, "batch_size": batch_size, "max_length": max_length, "precision": precision,
            "attention": attention, "compiled": compile_model, "tokens": tokens, "seconds": t["seconds"], "seconds_per_step": t["seconds"] / steps,
            "tokens_per_second": tokens / t["seconds"], "flops": flops, "flops_per_second": flops["flops"] / t["seconds"],
            **peak_memory_mb(setup.device)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--attention", choices=["eager", "sdpa"], default="eager")
    ap.add_argument("--compile", action="store_true", help="torch.compile θ's forward (dynamic shapes) first")
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "throughput.json")
    args = ap.parse_args()
    from trainables.checkpoint import write_json_atomic

    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak = matmul_peak(args.device, dtype)
    sheet = datasheet_peak(args.device, args.precision)
    results = []
    for name in args.cases:
        r = measure(name, CASES[name], args.steps, args.batch_size, args.max_length, args.device, args.precision,
                    args.attention, args.compile)
        r["fraction_of_measured_peak"] = r["flops_per_second"] / peak
        if sheet:
            r["fraction_of_datasheet_peak"] = r["flops_per_second"] / sheet["flops"]
        print(json.dumps({k: v for k, v in r.items() if k != "flops"}), flush=True)
        results.append(r)
    write_json_atomic(args.out, {
        "benchmark": "train_step tokens/s", "machine": machine(args.device),
        "peak_flops": {"measured_matmul": peak, "dtype": str(dtype), "datasheet": sheet},
        "results": results,
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
