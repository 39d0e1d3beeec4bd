"""Orchestration overhead: trials under Ray Tune + MLflow vs the same loop called directly; a study's start-up
with and without a running local Ray instance (`taalm ray start`).

    .venv/bin/python bench/orchestration.py                  # everything, 3 runs (~60 min on 2 quiet cores)
    .venv/bin/python bench/orchestration.py --skip-grid      # parts 1 and 3 only (~25 min)
    .venv/bin/python bench/orchestration.py --runs 1 --epochs 3 --skip-grid --skip-ray-train --out /tmp/o.json  # a smoke run

Every measurement runs in a fresh Python process (a child of this one), as a user's `taalm run` / `taalm ablate`
does: no module imported, no model loaded, no Ray connected by an earlier measurement.

Part 1, one trial (tiny preset, 32 TO-LEARN / 32 NOT-TO-FORGET facts, ``--epochs`` 30, a checkpoint every
epoch, 1 torch thread; about a minute called directly): the loop called directly (``continual_update``), then
the same config as a one-trial study three ways: on a new local Ray instance (``--address local``: what
`taalm ablate` does when no instance runs), attached to a running local instance (`taalm ray start`, started
once by this script before the runs and stopped after them), and on the Ray Train path (``resources.lean:
false``, a new instance). Each from the call (``continual_update`` / ``run_ablation``, the modules already
imported as the CLI has them at that point) to the first reported epoch (epoch 0: the evaluation before
training; the study's start-up: Ray, MLflow, the trial's process, its imports, the model) and to the end.
Overheads: (study wall - direct wall) / direct wall; after the first epoch: the same for the time after it.

Part 2, the Table 9 grid (ablations/table9_token_weighting.yaml: 7 trials, 2 at a time, the shipped φ) on the
tiny preset: each trial's config called directly one after another (in one process), then the grid as a study
(a new local instance); the study's wall is compared with the sum of the direct times divided by the
concurrency.

Part 3, the user's wait: `taalm ablate` (a one-trial grid) from the moment the process is spawned to the first
epoch line it prints, with and without the running instance.

Every ratio is taken within one run (direct and orchestrated back to back); the whole set runs ``--runs`` times
and the JSON keeps each run, the median and the range. Writes bench/results/orchestration.json (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLE9 = ROOT / "ablations" / "table9_token_weighting.yaml"
TAALM = str(Path(sys.executable).with_name("taalm"))


def _overrides(epochs: int, to_learn: int) -> dict:
    return {"train.epochs": epochs, "data.to_learn_size": to_learn, "data.ntf_size": 32, "checkpoint.every": 1}


def _grid_file(d: Path, name: str, epochs: int, to_learn: int, lean: bool = True) -> Path:
    import yaml

    grid = d / f"{name}.yaml"
    grid.write_text(yaml.safe_dump({"name": name, "base": str(ROOT / "examples" / "run_tiny.yaml"),
                                    "overrides": _overrides(epochs, to_learn), "seeds": [0],
                                    "resources": {"workers": 1, "cpus_per_worker": 1, "max_concurrent": 1,
                                                  "lean": lean}}))
    return grid


# -- the child process: one measurement ------------------------------------------------------------------------


def child(kind: str, d: Path, epochs: int, to_learn: int, result: Path) -> None:
    """In a fresh process: import what the CLI has imported when it calls the loop / the study, then time it."""
    from ray import tune

    from orchestrator.ablation import run_ablation
    from trainables.checkpoint import write_json_atomic
    from trainables.config import load_config
    from trainables.continual import continual_update
    from trainables.loop import Callback

    first: list[float] = []
    if kind == "direct":
        import torch

        torch.set_num_threads(1)  # as a trial with 1 CPU

        class First(Callback):
            def on_report(self, r):
                first.append(time.perf_counter())

        cfg = load_config(ROOT / "examples" / "run_tiny.yaml", [f"{k}={v}" for k, v in _overrides(epochs, to_learn).items()])
        t0 = time.perf_counter()
        continual_update(cfg, out_dir=d / "direct", callbacks=[First()])
    else:
        from orchestrator.progress import Progress

        class FirstResult(tune.Callback, Progress):  # the progress protocol (its lines unused) and Tune's events
            def on_trial_result(self, iteration, trials, trial, result, **info):
                first.append(time.perf_counter())

        grid = _grid_file(d, f"bench_{kind.replace('-', '_')}", epochs, to_learn, lean=kind != "study-ray-train")
        address = None if kind == "study-attached" else "local"  # attached: the running instance, else a new one
        t0 = time.perf_counter()
        r = run_ablation(grid, out_root=d / "studies", address=address, progress=FirstResult())
        assert r["failed"] == 0, r
    wall = time.perf_counter() - t0
    write_json_atomic(result, {"kind": kind, "wall_seconds": wall, "first_epoch_seconds": first[0] - t0})


def measure(kind: str, d: Path, epochs: int, to_learn: int, env: dict) -> dict:
    result = d / f"{kind}.json"
    p = subprocess.run([sys.executable, __file__, "--child", kind, "--dir", str(d), "--epochs", str(epochs),
                        "--to-learn", str(to_learn), "--result", str(result)], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return json.loads(result.read_text())


def cli_wait(d: Path, attached: bool, env: dict) -> dict:
    """`taalm ablate` from spawn to its first epoch line, and to its exit."""
    grid = _grid_file(d, f"bench_cli_{'attached' if attached else 'new'}", 1, 32)
    cmd = [TAALM, "ablate", str(grid), "--out", str(d / "cli")] + ([] if attached else ["--address", "local"])
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = None
    for line in p.stderr:
        if first is None and " epoch 0" in line:
            first = time.perf_counter() - t0
    code = p.wait()
    if code != 0 or first is None:
        raise RuntimeError(f"taalm ablate exited {code} (first epoch line: {first})")
    return {"spawn_to_first_epoch_seconds": first, "spawn_to_exit_seconds": time.perf_counter() - t0}


# -- part 2: the Table 9 grid ----------------------------------------------------------------------------------


def _direct_in_process(cfg) -> float:
    from trainables.continual import continual_update

    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        continual_update(cfg, out_dir=d)
        return time.perf_counter() - t0


def table9_grid(epochs: int, d: Path) -> dict:
    import ray
    import torch

    from orchestrator.grid import load_grid
    from orchestrator.ablation import run_ablation
    from orchestrator.phi_stage import meta_data_hash, phi_location

    torch.set_num_threads(1)
    overrides = ["overrides.model.name=tiny", "overrides.data.split=release", f"overrides.train.epochs={epochs}",
                 "name=bench_table9_tiny"]
    spec, trials, meta_cfg = load_grid(TABLE9, overrides)
    # not timed: one TAALM trial of one epoch, so that the meta stage has put φ in the cache for the direct runs (a
    # grid without a φ row runs no meta stage: from an empty cache the direct TAALM runs had no φ)
    run_ablation(TABLE9, overrides + ["axes={weighting.scheme: [train_attention]}", "overrides.train.epochs=1",
                                      "baseline=TAALM"],
                 out_root=d / "warmup", address="local")
    ray.shutdown()
    phi = phi_location(meta_cfg, meta_cfg["seed"], meta_data_hash(meta_cfg))[1] / "phi"
    direct = {}
    for t in trials:
        cfg = t.config
        if t.needs_phi:
            cfg = cfg.model_copy(update={"weighting": cfg.weighting.model_copy(update={
                "train_attention": cfg.weighting.train_attention.model_copy(update={"phi": str(phi)})})})
        direct[t.label] = _direct_in_process(cfg)
    t0 = time.perf_counter()
    r = run_ablation(TABLE9, overrides, out_root=d / "grid", address="local")
    wall = time.perf_counter() - t0
    ray.shutdown()
    conc = spec.resources.max_concurrent
    return {"trials": len(trials), "concurrency": conc, "direct_seconds": direct,
            "direct_sum_seconds": sum(direct.values()), "study_wall_seconds": wall,
            "wall_over_direct_sum_per_concurrency": wall / (sum(direct.values()) / conc), "failed": r["failed"]}


# -- the parent -------------------------------------------------------------------------------------------------


def _ratios(direct: dict, study: dict) -> dict:
    after_direct = direct["wall_seconds"] - direct["first_epoch_seconds"]
    after_study = study["wall_seconds"] - study["first_epoch_seconds"]
    return {"direct_seconds": direct["wall_seconds"], "orchestrated_seconds": study["wall_seconds"],
            "overhead_ratio": study["wall_seconds"] / direct["wall_seconds"] - 1.0,
            "study_startup_to_first_epoch_seconds": study["first_epoch_seconds"],
            "direct_startup_to_first_epoch_seconds": direct["first_epoch_seconds"],
            "overhead_after_first_epoch_ratio": after_study / after_direct - 1.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--to-learn", type=int, default=32)
    ap.add_argument("--grid-epochs", type=int, default=10)
    ap.add_argument("--skip-grid", action="store_true")
    ap.add_argument("--skip-ray-train", action="store_true")
    ap.add_argument("--note", default="", help="recorded in the JSON (e.g. 'shared machine')")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "orchestration.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.dir, args.epochs, args.to_learn, args.result)

    import torch

    from orchestrator import local_ray
    from trainables.checkpoint import write_json_atomic

    with tempfile.TemporaryDirectory() as top:
        # the running instance of the "attached" measurements: this script's own (its own record file)
        env = {**os.environ, local_ray.RECORD_ENV: str(Path(top) / "head.json")}
        os.environ[local_ray.RECORD_ENV] = env[local_ray.RECORD_ENV]
        # warm-up, not timed: the caches every measurement reads (tokenizer, scores, φ) exist before the first
        warm = Path(top) / "warm"
        warm.mkdir()
        measure("direct", warm, 1, args.to_learn, env)
        measure("study-new", warm, 1, args.to_learn, env)  # also MLflow's empty-store template
        local_ray.start_head()
        runs = []
        try:
            for i in range(args.runs):
                run: dict = {}
                with tempfile.TemporaryDirectory(dir=top) as d:
                    d = Path(d)
                    direct = measure("direct", d, args.epochs, args.to_learn, env)
                    run["lean"] = _ratios(direct, measure("study-new", d, args.epochs, args.to_learn, env))
                    run["lean_attached"] = _ratios(direct, measure("study-attached", d, args.epochs, args.to_learn, env))
                    if not args.skip_ray_train:
                        run["ray_train"] = _ratios(direct, measure("study-ray-train", d, args.epochs, args.to_learn,
                                                                   env))
                    run["cli"] = {"new": cli_wait(d, False, env), "attached": cli_wait(d, True, env)}
                    if not args.skip_grid:
                        run["table9_grid"] = table9_grid(args.grid_epochs, d)
                print(i, json.dumps(run), flush=True)
                runs.append(run)
        finally:
            local_ray.stop_head()
    keys = [("lean", "study_startup_to_first_epoch_seconds"), ("lean_attached", "study_startup_to_first_epoch_seconds"),
            ("lean", "direct_startup_to_first_epoch_seconds"),
            ("lean", "overhead_ratio"), ("lean_attached", "overhead_ratio"),
            ("lean", "overhead_after_first_epoch_ratio"), ("lean_attached", "overhead_after_first_epoch_ratio"),
            ("lean", "direct_seconds"),
            ("cli", "new", "spawn_to_first_epoch_seconds"), ("cli", "attached", "spawn_to_first_epoch_seconds")]
    if not args.skip_ray_train:
        keys += [("ray_train", "overhead_ratio"), ("ray_train", "study_startup_to_first_epoch_seconds"),
                 ("ray_train", "overhead_after_first_epoch_ratio")]
    if not args.skip_grid:
        keys.append(("table9_grid", "wall_over_direct_sum_per_concurrency"))
    summary = {}
    for path in keys:
        vals = []
        for r in runs:
            v = r
            for k in path:
                v = v[k]
            vals.append(v)
        vals.sort()
        summary[".".join(path)] = {"median": vals[len(vals) // 2], "min": vals[0], "max": vals[-1], "runs": vals}
    write_json_atomic(args.out, {
        "benchmark": "a study's start-up with and without a running local Ray instance; trials under Ray Tune + "
                     "MLflow (lean, attached, Ray Train) vs the loop called directly; each in a fresh process",
        "one_trial": {"preset": "tiny", "epochs": args.epochs, "to_learn": args.to_learn, "ntf": 32,
                      "torch_threads": 1},
        "table9_grid": None if args.skip_grid else {"preset": "tiny", "epochs": args.grid_epochs,
                                                    "split": "release", "grid": str(TABLE9.relative_to(ROOT))},
        "targets": {"lean_attached.study_startup_to_first_epoch_seconds": 5.0,
                    "lean.study_startup_to_first_epoch_seconds": 8.0, "lean_attached.overhead_ratio": 0.05},
        "summary": summary, "runs": runs, "note": args.note,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "load_average_at_end": os.getloadavg()}})
    for k, v in summary.items():
        print(f"{k}: median {v['median']:.3f} (range {v['min']:.3f}..{v['max']:.3f})")


if __name__ == "__main__":
    main()
