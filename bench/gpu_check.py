"""The GPU check: what a lent GPU machine should measure first, in one command under 8 minutes (no Ray, no MLflow
there: the loops run through `python -m orchestrator.cli run|meta-train` and the bench/ scripts).

    bash bench/gpu_check.sh                                           # on the GPU machine (../shared/gpu/README.md)
    GPU_CHECK_DEVICE=cpu GPU_CHECK_SCALE=dry bash bench/gpu_check.sh   # the dry run here: the CPU, small sizes

Phases, in order, each with its own time limit (a phase that fails or runs out of time is recorded, and the next
one runs; the whole check stops at --budget seconds):

1. ``correctness``: every registered weighting scheme, parameterisation, regulariser and replay method, and the
   execution options (bf16, fused attention, micro-batches), for one epoch of `tiny` on the device; meta-training of
   `tiny` on the device (its φ serves the train_attention cases). A tensor left on the CPU fails its case here.
2. ``core``: the Table 9 core rows (Finetune, TAALM with the shipped φ, Oracle) on full LAMA-CKL
   (examples/run_smollm2_full.yaml: 475 TO-LEARN / 132 NOT-TO-FORGET facts, 30 epochs), concurrently on the device;
   GPU time per trial-epoch = the phase's wall time / the epochs all rows completed.
3. ``bench``: bench/throughput.py (fp32 + eager; bf16 + fused attention; the same under torch.compile) and
   bench/meta_step.py on the device.
4. ``table1``: the Table 1 rows (K-Adapter, Mix-review, RecAdam, RHO-1 both ways) at full scale, concurrently,
   with whatever time is left.

Writes OUT/summary.json (updated after every phase) and, per run, its metrics.json and log under OUT/.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUDGET = 470.0  # seconds: the check on one H200 (the phases' limits are set for it)
CLI = [sys.executable, "-m", "orchestrator.cli"]
PHI = ROOT / "ablations" / "phi" / "smollm2-135m"

# every registered component, one epoch of tiny each (name -> --set overrides)
CORRECTNESS = {
    "weighting/uniform": [], "weighting/oracle": ["weighting.scheme=oracle"],
    "weighting/known_mask": ["weighting.scheme=known_mask"], "weighting/rho1": ["weighting.scheme=rho1"],
    "weighting/rho1_release": ["weighting.scheme=rho1", "weighting.rho1.selection=release",
                               "weighting.rho1.table_length=64"],
    "weighting/random": ["weighting.scheme=random"],
    "weighting/random_match": ["weighting.scheme=random", "weighting.random.match=oracle"],
    "weighting/train_attention": ["weighting.scheme=train_attention", "weighting.train_attention.phi={phi}"],
    "weighting/taalm_known_mask": ["weighting.scheme=train_attention*known_mask",
                                   "weighting.train_attention.phi={phi}"],
    "params/lora": ["params.kind=lora", "params.r=4"], "params/full": ["params.kind=full"],
    "params/kadapter": ["params.kind=kadapter", "params.kadapter.bottleneck=8"],
    "params/qlora": ["params.kind=qlora", "params.r=4"],
    "regularizer/recadam": ["regularizer.kind=recadam", "regularizer.recadam.pretrain_coef=100"],
    "regularizer/ewc": ["regularizer.kind=ewc", "regularizer.ewc.batches=1"],
    "replay/mix_review": ["replay.kind=mix_review", "replay.size=8"],
    "replay/gere": ["replay.kind=gere", "replay.size=8"],
    "replay/gere_kl": ["replay.kind=gere", "replay.gere.loss=kl", "replay.size=8"],
    "replay/seekr": ["replay.kind=seekr", "replay.size=8", "replay.seekr.head_budget=2"],
    "options/bf16": ["train.precision=bf16"], "options/sdpa": ["model.attention=sdpa"],
    "options/micro_batches": ["train.micro_batch_size=2", "train.oom=halve_batch"],
    "options/group_by_length": ["train.group_by_length=true"],
}
TINY = ["data.split=release", "data.to_learn_size=8", "data.ntf_size=8", "data.max_doc_tokens=64", "train.epochs=1",
        "train.batch_size=4", "train.max_length=64", "eval.batch_size=16"]

CORE = {"Finetune": [], "TAALM": ["weighting.scheme=train_attention", f"weighting.train_attention.phi={PHI}"],
        "Oracle": ["weighting.scheme=oracle"]}
TABLE1 = {"K-Adapter": ["params.kind=kadapter", "params.kadapter.bottleneck=64"],
          "Mix-review": ["replay.kind=mix_review", "replay.pool=disjoint", "replay.ratio=1.0"],
          "RecAdam": ["regularizer.kind=recadam", "regularizer.recadam.t0=250",
                      "regularizer.recadam.pretrain_coef=1000.0"],
          "RHO-1 (excess loss)": ["weighting.scheme=rho1"],
          "RHO-1 (release)": ["weighting.scheme=rho1", "weighting.rho1.selection=release"]}


class GpuSampler:
    """nvidia-smi's utilisation and memory every second, in a thread (nothing where there is no nvidia-smi)."""

    def __init__(self):
        self.samples: list[tuple[float, float, float]] = []
        self.proc = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                          "--format=csv,noheader,nounits", "-lms", "1000"],
                                         stdout=subprocess.PIPE, text=True)
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            parts = [x.strip() for x in line.split(",")]
            if len(parts) >= 2 and parts[0].replace(".", "").isdigit():
                self.samples.append((time.monotonic(), float(parts[0]), float(parts[1])))

    def window(self, t0: float, t1: float) -> dict:
        xs = [s for s in self.samples if t0 <= s[0] <= t1]
        if not xs:
            return {}
        return {"gpu_util_mean_pct": sum(s[1] for s in xs) / len(xs), "gpu_util_max_pct": max(s[1] for s in xs),
                "gpu_mem_max_mib": max(s[2] for s in xs), "samples": len(xs)}

    def stop(self):
        if self.proc:
            self.proc.terminate()


class Check:
    def __init__(self, out: Path, device: str, scale: str, budget: float):
        self.out, self.device, self.scale, self.budget = out, device, scale, budget
        self.t0 = time.monotonic()
        self.summary = {"device": device, "scale": scale, "budget_s": budget, "phases": {},
                        "python": sys.version.split()[0]}
        self.gpu = GpuSampler()
        try:
            import torch

            self.summary["torch"] = torch.__version__
            if torch.cuda.is_available():
                self.summary["gpu"] = torch.cuda.get_device_name(0)
        except ImportError:
            pass

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def save(self) -> None:
        self.summary["elapsed_s"] = time.monotonic() - self.t0
        tmp = self.out / "summary.json.tmp"
        tmp.write_text(json.dumps(self.summary, indent=1, default=str))
        os.replace(tmp, self.out / "summary.json")

    def phase(self, name: str, fn, limit: float) -> None:
        """Run one phase with ``limit`` seconds (scaled with the budget: a dry run on a CPU gets more)."""
        limit = min(limit * self.budget / DEFAULT_BUDGET, self.left() - 10)
        if limit < 20:
            self.summary["phases"][name] = {"status": "skipped", "reason": f"{self.left():.0f} s left"}
            self.save()
            return
        t0 = time.monotonic()
        try:
            result = fn(limit)
            status = "ok"
        except Exception as e:  # a phase's failure is a result; the next phase runs
            result, status = {"error": f"{type(e).__name__}: {e}"[:2000]}, "failed"
        t1 = time.monotonic()
        self.summary["phases"][name] = {"status": status, "wall_s": t1 - t0, **self.gpu.window(t0, t1), **result}
        self.save()
        print(f"[{t1 - self.t0:6.0f}s] {name}: {status} ({t1 - t0:.0f} s)", flush=True)

    # ---- processes -----------------------------------------------------------------------------------------

    def spawn(self, args: list[str], log: Path) -> subprocess.Popen:
        log.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        if self.device == "cpu":  # concurrent processes on a few cores: one thread each
            env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        return subprocess.Popen(args, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=ROOT, env=env)

    def wait_all(self, procs: dict, limit: float) -> dict:
        deadline = time.monotonic() + limit
        out = {}
        for name, p in procs.items():
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
                out[name] = p.returncode
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                out[name] = "timeout"
        return out

    # ---- the phases ----------------------------------------------------------------------------------------

    def correctness(self, limit: float) -> dict:
        """Every component for one epoch of tiny on the device, in a child process (a CUDA error kills it, not us)."""
        res_file = self.out / "correctness.json"
        p = self.spawn([sys.executable, __file__, "--child-correctness", str(res_file), "--device", self.device,
                        "--out", str(self.out)], self.out / "logs" / "correctness.log")
        code = self.wait_all({"correctness": p}, limit)["correctness"]
        cases = json.loads(res_file.read_text()) if res_file.is_file() else {}
        bad = [k for k, v in cases.items() if v["status"] == "failed"]
        return {"exit": code, "cases": cases, "failed": bad,
                "passed": sum(v["status"] == "ok" for v in cases.values()),
                "skipped": [k for k, v in cases.items() if v["status"] == "skipped"]}

    def _concurrent(self, rows: dict, limit: float, group: str, extra: list[str]) -> dict:
        base = ROOT / "examples" / "run_smollm2_full.yaml"
        procs, outs = {}, {}
        t0 = time.monotonic()
        for name, overrides in rows.items():
            d = self.out / group / re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
            shutil.rmtree(d, ignore_errors=True)
            sets = [x for o in overrides + extra + [f"device={self.device}"] for x in ("--set", o)]
            procs[name] = self.spawn(CLI + ["run", str(base), "--out", str(d / "run"), "--no-resume", *sets],
                                     d / "log.txt")
            outs[name] = d
        codes = self.wait_all(procs, limit)
        wall = time.monotonic() - t0
        rows_out, epochs_done = {}, 0
        for name, d in outs.items():
            m = d / "run" / "metrics.json"
            log = (d / "log.txt").read_text(errors="replace") if (d / "log.txt").is_file() else ""
            reached = [int(x) for x in re.findall(r"^epoch\s+(\d+):", log, flags=re.M)]
            row = {"exit": codes[name], "epochs_reached": max(reached) if reached else None}
            if m.is_file():
                metrics = json.loads(m.read_text())
                row.update({k: metrics.get(k) for k in ("top_acc", "top_epoch", "nf_acc", "total_knowledge",
                                                         "wall_seconds", "train_tokens_per_second", "n_to_learn",
                                                         "n_ntf")})
                row["to_learn_acc"], row["ntf_acc"] = metrics.get("to_learn_acc"), metrics.get("ntf_acc")
            else:
                row["log_tail"] = log[-1500:]
            epochs_done += row["epochs_reached"] or 0
            rows_out[name] = row
        return {"rows": rows_out, "concurrent": len(rows), "wall_s": wall, "trial_epochs": epochs_done,
                "gpu_seconds_per_trial_epoch": wall / epochs_done if epochs_done else None}

    def _scale(self) -> list[str]:
        if self.scale == "full":
            return []
        # the dry run: the same commands, small enough for a CPU
        return ["data.to_learn_size=8", "data.ntf_size=8", "data.max_doc_tokens=48", "train.epochs=2",
                "train.max_length=48", "eval.batch_size=16", "model.attention=eager", "train.precision=fp32"]

    def warm_caches(self, limit: float) -> dict:
        """SmolLM2 dequantized and its facts scored once, before the concurrent rows (each would wait for it)."""
        p = self.spawn(CLI + ["data", "tailor", "--model", "smollm2-135m", "--out", str(self.out / "split"),
                              "--set", f"device={self.device}", "--set", "eval.batch_size=128"],
                       self.out / "logs" / "tailor.log")
        return {"exit": self.wait_all({"tailor": p}, limit)["tailor"]}

    def core(self, limit: float) -> dict:
        return self._concurrent(CORE, limit, "core", self._scale())

    def table1(self, limit: float) -> dict:
        return self._concurrent(TABLE1, limit, "table1", self._scale())

    def bench(self, limit: float) -> dict:
        out = {}
        dry = self.scale != "full"
        runs = [("throughput_fp32_eager", [sys.executable, "bench/throughput.py", "--device", self.device,
                                           "--cases", "tiny/lora" if dry else "smollm2-135m/lora", "--steps",
                                           "2" if dry else "20", "--precision", "fp32", "--attention", "eager"]),
                ("throughput_bf16_sdpa", [sys.executable, "bench/throughput.py", "--device", self.device,
                                          "--cases", "tiny/lora" if dry else "smollm2-135m/lora", "--steps",
                                          "2" if dry else "20", "--precision", "bf16", "--attention", "sdpa"]),
                ("throughput_bf16_sdpa_compiled", [sys.executable, "bench/throughput.py", "--device", self.device,
                                                   "--cases", "tiny/lora" if dry else "smollm2-135m/lora", "--steps",
                                                   "2" if dry else "20", "--precision", "bf16", "--attention", "sdpa",
                                                   "--compile"]),
                ("meta_step", [sys.executable, "bench/meta_step.py", "--device", self.device, "--model",
                               "tiny" if dry else "smollm2-135m", "--runs", "1", "--repeats", "1" if dry else "3",
                               "--modes", "plain", "meta", "meta_chunked", "--batch", "4" if dry else "8",
                               "--max-length", "48" if dry else "96"])]
        deadline = time.monotonic() + limit
        for name, cmd in runs:
            target = self.out / f"bench_{name}.json"
            p = self.spawn(cmd + ["--out", str(target)], self.out / "logs" / f"{name}.log")
            code = self.wait_all({name: p}, max(5.0, deadline - time.monotonic()))[name]
            out[name] = json.loads(target.read_text()) if target.is_file() else {"exit": code}
        return out


def child_correctness(res_file: Path, device: str, out: Path) -> None:
    """Runs in its own process: a short meta-training on the device, then every case, one epoch of tiny each."""
    import importlib.util
    import traceback

    from trainables.config import load_config
    from trainables.continual import continual_update
    from trainables.meta import MetaConfig, meta_train

    results: dict = {}

    def save():
        res_file.write_text(json.dumps(results, indent=1))

    t = time.monotonic()
    try:
        meta_train(load_config(ROOT / "examples" / "meta_tiny.yaml", [f"device={device}", "meta.steps=2",
                                                                       "meta.val_every=2", "meta.precision=bf16"],
                               schema=MetaConfig), out_dir=out / "meta_tiny")
        results["meta/tiny_bf16"] = {"status": "ok", "seconds": time.monotonic() - t}
    except Exception as e:
        results["meta/tiny_bf16"] = {"status": "failed", "error": "".join(traceback.format_exception_only(e))[-800:]}
    save()
    phi = out / "meta_tiny" / "phi"
    for name, overrides in CORRECTNESS.items():
        if name == "params/qlora" and (device == "cpu" or importlib.util.find_spec("bitsandbytes") is None):
            results[name] = {"status": "skipped", "reason": "needs CUDA and bitsandbytes"}
            continue
        if "{phi}" in " ".join(overrides) and not (phi / "phi.json").is_file():
            results[name] = {"status": "skipped", "reason": "no φ: meta-training on the device failed"}
            continue
        t = time.monotonic()
        try:
            cfg = load_config(None, TINY + [f"device={device}"] + [o.format(phi=phi) for o in overrides])
            m = continual_update(cfg)
            results[name] = {"status": "ok", "seconds": time.monotonic() - t, "train_loss": m["train_loss"][-1]}
        except Exception as e:
            results[name] = {"status": "failed", "error": "".join(traceback.format_exception_only(e))[-800:]}
        save()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--scale", choices=["full", "dry"], default="full")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="seconds for the whole check")
    ap.add_argument("--child-correctness", type=Path)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.child_correctness:
        child_correctness(args.child_correctness, args.device, args.out)
        return
    c = Check(args.out, args.device, args.scale, args.budget)
    try:
        c.phase("correctness", c.correctness, 75)
        c.phase("warm_caches", c.warm_caches, 60)
        c.phase("core", c.core, 200)
        c.phase("bench", c.bench, 80)
        c.phase("table1", c.table1, (c.left() - 15) * DEFAULT_BUDGET / c.budget)
    finally:
        c.gpu.stop()
        c.save()
    print(json.dumps({k: v.get("status") for k, v in c.summary["phases"].items()}))


if __name__ == "__main__":
    main()
