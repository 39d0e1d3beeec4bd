"""Orchestration overhead: one trial under Ray Tune + Ray Train + MLflow vs the same loop called directly.

    python bench/orchestration.py [--epochs 30] [--out bench/results/orchestration.json]

Both runs use the same config (tiny preset, sized so the direct run takes about a minute or more).
Reports the wall time of each, the overhead ratio, and the study start-up time (from the call to
the first reported epoch, which includes Ray start-up, MLflow setup, the Train worker group, model
loading and the epoch-0 evaluation; the same model loading and evaluation are timed in the direct run).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import yaml
from ray import tune

ROOT = Path(__file__).resolve().parents[1]


class FirstResult(tune.Callback):
    def __init__(self):
        self.first = None

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.first is None:
            self.first = time.perf_counter()



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--to-learn", type=int, default=32)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "orchestration.json")
    args = ap.parse_args()
    overrides = {"train.epochs": args.epochs, "data.to_learn_size": args.to_learn, "data.ntf_size": 32,
                 "checkpoint.every": 1}

    from trainables.checkpoint import write_json_atomic
    from trainables.config import load_config
    from trainables.continual import Callback, continual_update

    torch.set_num_threads(1)  # as a Ray Train worker with 1 CPU
    cfg = load_config(ROOT / "examples" / "run_tiny.yaml", [f"{k}={v}" for k, v in overrides.items()])

    class First(Callback):
        first = None

        def on_epoch_end(self, r):
            if First.first is None:
                First.first = time.perf_counter()

    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        continual_update(cfg, out_dir=d, callbacks=[First()])
        direct = time.perf_counter() - t0
        direct_first = First.first - t0

        grid = Path(d) / "bench_grid.yaml"
        grid.write_text(yaml.safe_dump({"name": "bench_orchestration", "base": str(ROOT / "examples" / "run_tiny.yaml"),
                                        "overrides": overrides, "seeds": [0],
                                        "resources": {"workers": 1, "cpus_per_worker": 1, "max_concurrent": 1}}))
        from orchestrator.study import run_ablation

        cb = FirstResult()
        t0 = time.perf_counter()
        run_ablation(grid, out_root=Path(d) / "studies", progress=cb)
        orchestrated = time.perf_counter() - t0
        startup = cb.first - t0
    result = {
        "benchmark": "one trial under Ray Tune + Ray Train + MLflow vs the loop called directly",
        "config": overrides, "direct_seconds": direct, "orchestrated_seconds": orchestrated,
        "overhead_ratio": orchestrated / direct - 1.0,
        # the same comparison after the first reported epoch: per-epoch cost of Tune + Train + MLflow,
        # without the one-time start-up (Ray, MLflow store, Train worker group, model load, epoch-0 eval)
        "overhead_after_first_epoch_ratio": (orchestrated - startup) / (direct - direct_first) - 1.0,
        "study_startup_to_first_epoch_seconds": startup, "direct_startup_to_first_epoch_seconds": direct_first,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
    }
    write_json_atomic(args.out, result)
    print(result)


if __name__ == "__main__":
    main()
