"""Training throughput (tokens/s) of the continual loop's weighted update, per model preset.

    python bench/throughput.py [--steps 8] [--out bench/results/throughput.json]

Measures `trainables.continual.train_step` (forward, weights, backward, optimizer step) on batches of
TO-LEARN documents; tokens are real (non-padding) predicted tokens. Timings are only comparable
within one run on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from trainables.checkpoint import write_json_atomic
from trainables.config import load_config
from trainables.continual import make_optimizer, prepare_run, train_step

CASES = {
    "tiny/full": ["model.name=tiny", "params.kind=full", "data.split=release"],
    "tiny/lora": ["model.name=tiny", "params.kind=lora", "params.r=16", "data.split=release"],
    "smollm2-135m/lora": ["model.name=smollm2-135m", "params.kind=lora", "params.r=16", "data.split=tailored"],
    "smollm2-135m/full": ["model.name=smollm2-135m", "params.kind=full", "data.split=tailored"],
}


def measure(name: str, overrides: list[str], steps: int, batch_size: int, max_length: int) -> dict:
    cfg = load_config(None, overrides + [f"train.batch_size={batch_size}", f"train.max_length={max_length}",
                                         f"data.to_learn_size={batch_size * (steps + 2)}", "data.ntf_size=1",
                                         "weighting.scheme=uniform", "params.dropout=0.0"])
    setup = prepare_run(cfg)
    opt = make_optimizer(cfg, list(setup.trainable.values()))
    docs = setup.docs
    batches = [docs[i:i + batch_size] for i in range(0, len(docs), batch_size)]
    gen = torch.Generator().manual_seed(0)
    for b in batches[:2]:  # warm-up
        train_step(setup, opt, b, gen)
    tokens, t0 = 0, time.perf_counter()
    for b in batches[2:2 + steps]:
        tokens += train_step(setup, opt, b, gen)[2]
    dt = time.perf_counter() - t0
    return {"case": name, "steps": steps, "batch_size": batch_size, "max_length": max_length,
            "tokens": tokens, "seconds": dt, "tokens_per_second": tokens / dt,
            "trainable_params": sum(p.numel() for p in setup.trainable.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "throughput.json")
    args = ap.parse_args()
    results = []
    for name in args.cases:
        r = measure(name, CASES[name], args.steps, args.batch_size, args.max_length)
        print(json.dumps(r))
        results.append(r)
    write_json_atomic(args.out, {
        "benchmark": "train_step tokens/s",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(),
                    "device": "cuda" if torch.cuda.is_available() else "cpu"},
        "results": results,
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
