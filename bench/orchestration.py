"""Orchestration overhead: trials under Ray Tune + MLflow vs the same loop called directly.

    python bench/orchestration.py [--runs 3] [--epochs 30] [--grid-epochs 10] [--skip-grid]

Part 1, one trial (tiny preset, sized so the direct run takes about a minute): the loop called directly,
then the same config as a one-trial study on the default path (lean: the loop inside its Tune trial
process) and on the Ray Train path (``resources.lean: false``: a TorchTrainer per trial). For each: the
whole wall time, the start-up (from the call to the first reported epoch: Ray start-up, MLflow store, the
trial's process, model loading and the epoch-0 evaluation; the direct run times its own model loading and
evaluation), and the time after the first epoch.

Part 2, the Table 9 grid (ablations/table9_token_weighting.yaml: 7 trials, 2 at a time, the shipped φ) on the
tiny preset: each trial's config called directly one after another, then the grid as a study; the study's
wall is compared with the sum of the direct times divided by the concurrency.

Every ratio is taken within one run (direct and orchestrated back to back); the whole set runs ``--runs``
times and the JSON keeps each run, the median and the range. Writes bench/results/orchestration.json.
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
TABLE9 = ROOT / "ablations" / "table9_token_weighting.yaml"


class FirstResult(tune.Callback):
    def __init__(self):
        self.first = None

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.first is None:
            self.first = time.perf_counter()


def _direct(cfg) -> tuple[float, float]:
    """(wall, seconds to the first evaluated epoch) of the loop called in this process."""
    from trainables.continual import continual_update
    from trainables.loop import Callback

    class First(Callback):
        first = None

        def on_report(self, r):
            if First.first is None:
                First.first = time.perf_counter()

    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        continual_update(cfg, out_dir=d, callbacks=[First()])
        return time.perf_counter() - t0, First.first - t0


def one_trial(epochs: int, to_learn: int, lean: bool, d: Path) -> dict:
    from trainables.config import load_config
    from orchestrator.study import run_ablation

    overrides = {"train.epochs": epochs, "data.to_learn_size": to_learn, "data.ntf_size": 32, "checkpoint.every": 1}
    cfg = load_config(ROOT / "examples" / "run_tiny.yaml", [f"{k}={v}" for k, v in overrides.items()])
    direct, direct_first = _direct(cfg)
    grid = d / f"bench_grid_{lean}.yaml"
    grid.write_text(yaml.safe_dump({"name": f"bench_orchestration_{'lean' if lean else 'train'}",
                                    "base": str(ROOT / "examples" / "run_tiny.yaml"), "overrides": overrides,
                                    "seeds": [0], "resources": {"workers": 1, "cpus_per_worker": 1,
                                                                "max_concurrent": 1, "lean": lean}}))
    cb = FirstResult()
    t0 = time.perf_counter()
    run_ablation(grid, out_root=d / "studies", progress=cb)
    orchestrated = time.perf_counter() - t0
    startup = cb.first - t0
    return {"path": "lean" if lean else "ray_train", "direct_seconds": direct, "orchestrated_seconds": orchestrated,
            "overhead_ratio": orchestrated / direct - 1.0,
            "study_startup_to_first_epoch_seconds": startup, "direct_startup_to_first_epoch_seconds": direct_first,
            "overhead_after_first_epoch_ratio": (orchestrated - startup) / (direct - direct_first) - 1.0}


def table9_grid(epochs: int, d: Path) -> dict:
    import ray

    from orchestrator.grid import load_grid
    from orchestrator.study import meta_data_hash, phi_location, run_ablation

    overrides = ["overrides.model.name=tiny", "overrides.data.split=release", f"overrides.train.epochs={epochs}",
                 "name=bench_table9_tiny"]
    spec, trials, meta_cfg = load_grid(TABLE9, overrides)
    # not timed: one Finetune trial, so the meta stage has put the shipped φ in the cache for the direct runs
    run_ablation(TABLE9, overrides + ["axes={weighting.scheme: [uniform]}"], out_root=d / "warmup")
    ray.shutdown()
    phi = phi_location(meta_cfg, meta_cfg["seed"], meta_data_hash(meta_cfg))[1] / "phi"
    direct = {}
    for t in trials:
        cfg = t.config
        if t.needs_phi:
            cfg = cfg.model_copy(update={"weighting": cfg.weighting.model_copy(update={
                "train_attention": cfg.weighting.train_attention.model_copy(update={"phi": str(phi)})})})
        direct[t.label] = _direct(cfg)[0]
    t0 = time.perf_counter()
    r = run_ablation(TABLE9, overrides, out_root=d / "grid")
    wall = time.perf_counter() - t0
    conc = spec.resources.max_concurrent
    return {"trials": len(trials), "concurrency": conc, "direct_seconds": direct,
            "direct_sum_seconds": sum(direct.values()), "study_wall_seconds": wall,
            "wall_over_direct_sum_per_concurrency": wall / (sum(direct.values()) / conc), "failed": r["failed"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--to-learn", type=int, default=32)
    ap.add_argument("--grid-epochs", type=int, default=10)
    ap.add_argument("--skip-grid", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "orchestration.json")
    args = ap.parse_args()
    torch.set_num_threads(1)  # as a trial with 1 CPU
    import ray

    from trainables.checkpoint import write_json_atomic

    runs = []
    for i in range(args.runs):
        run = {}
        with tempfile.TemporaryDirectory() as d:
            for lean in (True, False):
                run["lean" if lean else "ray_train"] = one_trial(args.epochs, args.to_learn, lean, Path(d))
                ray.shutdown()
                print(i, run["lean" if lean else "ray_train"], flush=True)
            if not args.skip_grid:
                run["table9_grid"] = table9_grid(args.grid_epochs, Path(d))
                ray.shutdown()
                print(i, run["table9_grid"], flush=True)
        runs.append(run)
    keys = [("lean", "overhead_ratio"), ("lean", "study_startup_to_first_epoch_seconds"),
            ("lean", "overhead_after_first_epoch_ratio"), ("ray_train", "overhead_ratio"),
            ("ray_train", "study_startup_to_first_epoch_seconds"), ("ray_train", "overhead_after_first_epoch_ratio")]
    if not args.skip_grid:
        keys.append(("table9_grid", "wall_over_direct_sum_per_concurrency"))
    summary = {}
    for part, k in keys:
        vals = sorted(r[part][k] for r in runs)
        summary[f"{part}.{k}"] = {"median": vals[len(vals) // 2], "min": vals[0], "max": vals[-1], "runs": vals}
    write_json_atomic(args.out, {
        "benchmark": "trials under Ray Tune + MLflow (lean and Ray Train paths) vs the loop called directly",
        "one_trial": {"preset": "tiny", "epochs": args.epochs, "to_learn": args.to_learn, "ntf": 32},
        "table9_grid": None if args.skip_grid else {"preset": "tiny", "epochs": args.grid_epochs,
                                                    "split": "release", "grid": str(TABLE9.relative_to(ROOT))},
        "summary": summary, "runs": runs,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__}})
    for k, v in summary.items():
        print(f"{k}: median {v['median']:.3f} (range {v['min']:.3f}..{v['max']:.3f})")


if __name__ == "__main__":
    main()
