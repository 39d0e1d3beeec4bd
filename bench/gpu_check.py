"""The GPU check, in three phases that each fit one command on the lent GPU machine (../shared/gpu/README.md: no Ray,
no MLflow there; the loops run through the `taalm` CLI and bench/ scripts). bench/gpu_check.sh is the entry point:

    bash .gpu/1/setup.sh && bash bench/gpu_check.sh A                  # command 1 (tiny only: no SmolLM2 needed)
    bash .gpu/2/stash.sh                                               # command 2
    source .gpu/3/env.sh && bash bench/gpu_check.sh B C                # command 3
    GPU_CHECK_DEVICE=cpu GPU_CHECK_SCALE=dry bash bench/gpu_check.sh A B C   # the dry run on a CPU, small sizes
    GPU_CHECK_PLANT=1 ...                                              # plants a failing case in every phase

A ``correctness`` (90 s on the GPU): a bf16 meta-training of `tiny` (2 meta-steps; its φ serves the train_attention
  cases), then every registered weighting scheme, parameterisation, regulariser and replay method and the execution
  options for one epoch of `tiny`, in fp32 and in bf16 (two processes at once); epoch 0 must be the same in both
  (evaluation runs in fp32 whatever the training precision): its metrics, and its object-position logits' digest.
B ``table9`` (180 s): SmolLM2 dequantized and LAMA-CKL tailored once (`taalm data tailor`), then the Table 9 core rows
  (Finetune, TAALM with the shipped φ, Oracle) on full LAMA-CKL (examples/run_smollm2_full.yaml: 475 / 132 facts,
  bf16, fused attention) at once. The first epoch is measured and the rows stop after the last epoch that fits the
  budget; every epoch's numbers come from the runs' OUT/epochs.jsonl (written as each epoch ends, so a stopped row
  reports every finished one). GPU seconds per trial-epoch over the window where all rows train, nvidia-smi's
  utilisation over it.
C ``bench`` (150 s): bench/throughput.py (fp32 + eager, bf16 + fused attention: tokens/s, fraction of the measured
  and the datasheet peak), bench/meta_step.py (meta-step × plain step), then the compiled throughput on its own with
  the time left.

Every case runs in a process group of its own, stopped as a group (SIGTERM, then SIGKILL: bench/meta_step.py's
subprocess and inductor's workers with it). A phase prints its budget first and stops by its deadline. OUT/summary.json
(rewritten after every case) says each case's status (ok, failed, timeout, skipped); the exit status is 1 when a case
of a phase failed or ran out of time, 0 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CLI = [sys.executable, "-c", "import sys; from orchestrator.cli import main; sys.argv[0] = 'taalm'; main()"]
PHI = ROOT / "ablations" / "phi" / "smollm2-135m"
# seconds per phase: on one H200 (the 15 minutes of a lent machine: ../shared/gpu/README.md), and the dry run here
BUDGETS = {"full": {"A": 90, "B": 180, "C": 150}, "dry": {"A": 900, "B": 600, "C": 420}}
PLANTED = ["weighting.scheme=no_such_scheme"]  # GPU_CHECK_PLANT=1: a case that must fail

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
    "options/sdpa": ["model.attention=sdpa"],
    "options/micro_batches": ["train.micro_batch_size=2", "train.oom=halve_batch"],
    "options/group_by_length": ["train.group_by_length=true"],
}
TINY = ["data.split=release", "data.to_learn_size=8", "data.ntf_size=8", "data.max_doc_tokens=64", "train.epochs=1",
        "train.batch_size=4", "train.max_length=64", "eval.batch_size=16"]
CORE = {"Finetune": [], "TAALM": ["weighting.scheme=train_attention", f"weighting.train_attention.phi={PHI}"],
        "Oracle": ["weighting.scheme=oracle"]}
DRY_FULL = ["data.to_learn_size=8", "data.ntf_size=8", "data.max_doc_tokens=48", "train.max_length=48",
            "eval.batch_size=16"]  # the dry run: SmolLM2 on a few facts


class GpuSampler:
    """nvidia-smi's utilisation and memory every second, stamped with the wall clock (nothing without nvidia-smi)."""

    def __init__(self):
        self.samples: list[tuple[float, float, float]] = []
        self.proc = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                          "--format=csv,noheader,nounits", "-lms", "1000"],
                                         stdout=subprocess.PIPE, text=True, start_new_session=True)
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            parts = [x.strip() for x in line.split(",")]
            if len(parts) >= 2 and parts[0].replace(".", "").isdigit():
                self.samples.append((time.time(), float(parts[0]), float(parts[1])))

    def window(self, t0: float, t1: float) -> dict:
        xs = [s for s in self.samples if t0 <= s[0] <= t1]
        if not xs:
            return {}
        return {"gpu_util_mean_pct": round(sum(s[1] for s in xs) / len(xs), 1), "gpu_util_max_pct": max(s[1] for s in xs),
                "gpu_mem_max_mib": max(s[2] for s in xs), "gpu_samples": len(xs)}

    def stop(self):
        if self.proc:
            self.proc.terminate()


def stop_group(p: subprocess.Popen, grace: float = 5.0) -> None:
    """Stop a case and every process it started (its own process group): SIGTERM, then SIGKILL after ``grace``."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=wait)
            if sig == signal.SIGKILL:
                return
        except subprocess.TimeoutExpired:
            continue
    try:  # the leader gone, children may remain in the group
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Check:
    def __init__(self, out: Path, device: str, scale: str, plant: bool):
        self.out, self.device, self.scale, self.plant = out, device, scale, plant
        self.summary = {"device": device, "scale": scale, "planted_failure": plant, "phases": {},
                        "python": sys.version.split()[0]}
        old = out / "summary.json"
        if old.is_file():  # phases of an earlier command on this machine (e.g. A, then B C)
            self.summary["phases"] = json.loads(old.read_text()).get("phases", {})
        self.gpu = GpuSampler()
        try:
            import torch

            self.summary["torch"] = torch.__version__
            if torch.cuda.is_available():
                self.summary["gpu"] = torch.cuda.get_device_name(0)
        except ImportError:
            pass
        self.procs: list[subprocess.Popen] = []

    def save(self) -> None:
        tmp = self.out / "summary.json.tmp"
        tmp.write_text(json.dumps(self.summary, indent=1, default=str))
        os.replace(tmp, self.out / "summary.json")

    def spawn(self, args: list[str], log: Path, concurrent: int = 1) -> subprocess.Popen:
        """A case in a process group of its own; torch's CPU threads shared out among the processes at once."""
        log.parent.mkdir(parents=True, exist_ok=True)
        threads = str(max(1, (os.cpu_count() or 1) // concurrent))
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", OMP_NUM_THREADS=threads,
                   MKL_NUM_THREADS=threads)
        p = subprocess.Popen(args, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                             start_new_session=True)
        self.procs.append(p)
        return p

    def wait(self, p: subprocess.Popen, deadline: float):
        """The exit code, or "timeout" (the case's group stopped) at ``deadline`` (time.monotonic())."""
        try:
            return p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            stop_group(p)
            return "timeout"

    def run_phase(self, name: str, fn) -> bool:
        budget = BUDGETS[self.scale][name]
        t0, w0 = time.monotonic(), time.time()
        print(f"phase {name}: budget {budget} s (until {time.strftime('%H:%M:%S', time.localtime(w0 + budget))}), "
              f"device {self.device}, scale {self.scale}{', a failing case planted' if self.plant else ''}", flush=True)
        phase = self.summary["phases"][name] = {"budget_s": budget, "status": "running", "cases": {}}
        self.save()
        try:
            phase.update(fn(phase, t0 + budget - 3))
        except Exception as e:  # noqa: BLE001 (the phase's own failure is a result)
            phase["error"] = f"{type(e).__name__}: {e}"[:2000]
        finally:
            for p in self.procs:
                if p.poll() is None:
                    stop_group(p)
            self.procs.clear()
        phase["wall_s"] = round(time.monotonic() - t0, 1)
        phase.update(self.gpu.window(w0, time.time()))
        bad = [k for k, c in phase["cases"].items() if c.get("status") in ("failed", "timeout")]
        phase["failed"] = bad
        phase["status"] = "failed" if bad or "error" in phase else "ok"
        phase["within_budget"] = phase["wall_s"] <= budget
        self.save()
        print(f"phase {name}: {phase['status']} in {phase['wall_s']:.0f} s of {budget}"
              + (f"; failed: {', '.join(bad)}" if bad else "") + (f"; {phase['error']}" if "error" in phase else ""),
              flush=True)
        return phase["status"] == "ok"

    # ---- A: correctness ------------------------------------------------------------------------------------------

    def correctness(self, phase: dict, deadline: float) -> dict:
        d = self.out / "A"
        meta = self.spawn(CLI + ["meta-train", str(ROOT / "examples" / "meta_tiny.yaml"), "--out", str(d / "meta"),
                                 "--set", f"device={self.device}", "--set", "meta.steps=2", "--set", "meta.val_every=2",
                                 "--set", "meta.precision=bf16"], d / "logs" / "meta.log")
        t = time.monotonic()
        code = self.wait(meta, deadline)
        phase["cases"]["meta/tiny_bf16"] = _status(code, time.monotonic() - t, d / "logs" / "meta.log")
        self.save()
        children = {p: self.spawn([sys.executable, __file__, "--child", p, "--device", self.device, "--out", str(d)]
                                  + (["--plant"] if self.plant else []), d / "logs" / f"cases_{p}.log", concurrent=2)
                    for p in ("fp32", "bf16")}
        codes = {p: self.wait(c, deadline) for p, c in children.items()}
        results = {}
        for p, code in codes.items():
            f = d / f"cases_{p}.json"
            results[p] = json.loads(f.read_text()) if f.is_file() else {}
            for case, r in results[p].items():
                phase["cases"][f"{case} [{p}]"] = r
            if code != 0:  # a crash or a timeout of the process: the cases it did not reach
                for case in list(CORRECTNESS) + (["planted/failure"] if self.plant else []):
                    if case not in results[p]:
                        phase["cases"][f"{case} [{p}]"] = {"status": "timeout" if code == "timeout" else "failed",
                                                           "error": f"not reached (process: {code})"}
        compared = equal = bitwise = 0
        for case, r32 in results.get("fp32", {}).items():
            r16 = results.get("bf16", {}).get(case)
            if r32.get("status") != "ok" or not r16 or r16.get("status") != "ok":
                continue
            compared += 1
            equal += r32["epoch0"] == r16["epoch0"]
            bitwise += r32["epoch0_logits"] == r16["epoch0_logits"]
            if r32["epoch0"] != r16["epoch0"]:  # evaluation is fp32 whatever the training precision
                phase["cases"][f"epoch0 fp32 = bf16: {case}"] = {"status": "failed", "fp32": r32["epoch0"],
                                                                 "bf16": r16["epoch0"]}
        return {"epoch0_compared": compared, "epoch0_equal": equal, "epoch0_logits_bitwise_equal": bitwise}

    # ---- B: the Table 9 core rows --------------------------------------------------------------------------------

    def table9(self, phase: dict, deadline: float) -> dict:
        d = self.out / "B"
        dry = DRY_FULL if self.scale == "dry" else []
        t = time.monotonic()
        tailor = self.spawn(CLI + ["data", "tailor", "--model", "smollm2-135m", "--out", str(d / "split"),
                                   "--set", f"device={self.device}", "--set", "eval.batch_size=128"],
                            d / "logs" / "tailor.log")
        code = self.wait(tailor, t + 0.5 * (deadline - t))
        phase["cases"]["tailor"] = _status(code, time.monotonic() - t, d / "logs" / "tailor.log")
        self.save()
        rows = dict(CORE, **({"planted/failure": PLANTED} if self.plant else {}))
        procs, dirs, t_start = {}, {}, time.time()
        for name, overrides in rows.items():
            dirs[name] = d / re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
            sets = [x for o in overrides + dry + [f"device={self.device}", "checkpoint.every=0"] for x in ("--set", o)]
            procs[name] = self.spawn(CLI + ["run", str(ROOT / "examples" / "run_smollm2_full.yaml"), "--out",
                                            str(dirs[name] / "run"), "--no-resume", *sets], dirs[name] / "log.txt",
                                     concurrent=len(rows))
        planned, first_epoch_s, stopped = None, None, {}
        while time.monotonic() < deadline and any(p.poll() is None for n, p in procs.items() if n not in stopped):
            time.sleep(1.0)
            epochs = {n: _epochs(dirs[n]) for n in CORE}
            if planned is None and all(len(e) >= 2 for e in epochs.values()):
                # the first epoch measured: the last epoch that ends before the deadline (the same pace for all)
                first_epoch_s = max(e[1]["time"] - e[0]["time"] for e in epochs.values())
                ends = max(e[1]["time"] for e in epochs.values())
                left = deadline - 5 - time.monotonic() + (time.time() - ends)
                planned = max(1, min(_total(epochs), 1 + int(left // first_epoch_s)))
            for n, e in epochs.items():
                if planned is not None and n not in stopped and e and e[-1]["index"] >= planned:
                    stop_group(procs[n])
                    stopped[n] = e[-1]["index"]
        out_rows = {}
        for name, p in procs.items():
            code = p.poll()
            if code is None:
                stop_group(p)
                code = "timeout"
            e = _epochs(dirs[name])
            trained = [r for r in e if r["index"] >= 1]
            ok = code == 0 or name in stopped or (code == "timeout" and trained)
            row = {"status": "ok" if ok else ("timeout" if code == "timeout" else "failed"), "exit": code,
                   "epochs": len(trained), "of": e[-1]["total"] if e else None,
                   "stopped_after_planned_epochs": name in stopped}
            if e:
                row.update(_curve(e))
            else:
                row["log_tail"] = _tail(dirs[name] / "log.txt")
            out_rows[name] = row
            phase["cases"][f"row {name}"] = row
        return {"rows": out_rows, "first_epoch_s": first_epoch_s, "planned_epochs": planned,
                **self._pace({n: _epochs(dirs[n]) for n in CORE}, t_start)}

    def _pace(self, epochs: dict, t_start: float) -> dict:
        """GPU seconds per trial-epoch where every row trains at once (from the last epoch 0 to the first row's last
        epoch), and the GPU's utilisation there."""
        if not epochs or not all(epochs.values()):
            return {}
        t_a = max(e[0]["time"] for e in epochs.values())
        t_b = min(e[-1]["time"] for e in epochs.values())
        n = sum(1 for e in epochs.values() for r in e if r["index"] >= 1 and t_a < r["time"] <= t_b)
        per_row = sorted(r.get("train_seconds", 0) + r.get("eval_seconds", 0) for e in epochs.values()
                         for r in e if r["index"] >= 1)
        out = {"window_s": round(t_b - t_a, 1), "trial_epochs_in_window": n, "rows_at_once": len(epochs),
               "epoch_seconds_per_row_median": per_row[len(per_row) // 2] if per_row else None,
               "load_and_epoch0_s": round(t_a - t_start, 1)}
        if n:
            out["gpu_seconds_per_trial_epoch"] = round((t_b - t_a) / n, 2)
            out.update({f"window_{k}": v for k, v in self.gpu.window(t_a, t_b).items()})
        return out

    # ---- C: the CUDA benchmarks ----------------------------------------------------------------------------------

    def bench(self, phase: dict, deadline: float) -> dict:
        d = self.out / "C"
        dry = self.scale == "dry"
        model, case = ("tiny", "tiny/lora") if dry else ("smollm2-135m", "smollm2-135m/lora")
        steps = ["--steps", "2" if dry else "20"]
        tp = [sys.executable, str(ROOT / "bench" / "throughput.py"), "--device", self.device, "--cases", case, *steps]
        # each case: a process that imports torch and transformers, starts CUDA and loads SmolLM2 (~10 s), then measures
        runs = [("throughput_fp32_eager", tp + ["--precision", "fp32", "--attention", "eager"], 30),
                ("throughput_bf16_sdpa", tp + ["--precision", "bf16", "--attention", "sdpa"], 30),
                ("meta_step", [sys.executable, str(ROOT / "bench" / "meta_step.py"), "--device", self.device,
                               "--model", model, "--runs", "1", "--repeats", "1" if dry else "3", "--modes", "plain",
                               "meta", "--batch", "4" if dry else "8", "--max-length", "48" if dry else "96",
                               "--precision", "bf16"], 50),  # a process per mode
                ("throughput_bf16_sdpa_compiled", tp + ["--precision", "bf16", "--attention", "sdpa", "--compile"],
                 None)]  # torch.compile on its own: the time left
        if self.plant:
            runs.insert(0, ("planted/failure", tp[:5] + ["no/such_case"], 15))
        out = {}
        for name, cmd, limit in runs:
            target = d / f"{name.replace('/', '_')}.json"
            log = d / "logs" / f"{name.replace('/', '_')}.log"
            t = time.monotonic()
            scale = BUDGETS[self.scale]["C"] / BUDGETS["full"]["C"]  # the dry run's cases: as much longer
            code = self.wait(self.spawn(cmd + ["--out", str(target)], log), min(deadline, t + (limit or 1e9) * scale))
            if code == 0 and not target.is_file():
                code = "exit 0 without its JSON"
            case = _status(code, time.monotonic() - t, log)
            if target.is_file():
                out[name] = _bench_figures(json.loads(target.read_text()))
                case.update(out[name])
            phase["cases"][name] = case
            self.save()
        return {"figures": out}


def _status(code, seconds: float, log: Path) -> dict:
    ok = code == 0
    r = {"status": "ok" if ok else ("timeout" if code == "timeout" else "failed"), "exit": code,
         "seconds": round(seconds, 1)}
    if not ok:
        r["log_tail"] = _tail(log)
    return r


def _tail(path: Path, n: int = 1200) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _epochs(d: Path) -> list[dict]:
    from trainables.loop import read_epochs

    return read_epochs(d / "run" / "epochs.jsonl")


def _total(epochs: dict) -> int:
    return max(e[-1]["total"] for e in epochs.values())


def _curve(e: list[dict]) -> dict:
    """The row's numbers from its finished epochs (Table 9's columns over what ran), epoch 0 against the tailored
    split's definition (TO-LEARN 0, NOT-TO-FORGET 1: facts SmolLM2 gets wrong / right in fp32)."""
    from trainables.metrics import summarize

    s = summarize([r["to_learn_acc"] for r in e], [r["ntf_acc"] for r in e])
    return {**{k: round(v, 4) if isinstance(v, float) else v for k, v in s.items()},
            "epoch0": {"to_learn_acc": e[0]["to_learn_acc"], "ntf_acc": e[0]["ntf_acc"]},
            "to_learn_acc": [round(r["to_learn_acc"], 4) for r in e], "ntf_acc": [round(r["ntf_acc"], 4) for r in e],
            "train_loss": [r["train_loss"] for r in e]}


def _bench_figures(result: dict) -> dict:
    """What the summary shows of a bench JSON: tokens/s and the fractions of peak, or meta-step × plain."""
    if "results" in result:  # bench/throughput.py
        r = result["results"][0]
        return {k: r.get(k) for k in ("tokens_per_second", "seconds_per_step", "fraction_of_measured_peak",
                                      "fraction_of_datasheet_peak", "gpu_peak_allocated_mb") if k in r}
    return {"summary": result.get("summary")}


def child(precision: str, device: str, out: Path, plant: bool) -> None:
    """Every case for one epoch of tiny at ``precision``, in this process; each case's result as it ends."""
    import traceback

    import torch

    import trainables.metrics as metrics
    from trainables.config import load_config
    from trainables.continual import continual_update
    from trainables.loop import Callback

    digest = hashlib.sha256()

    def judged(logits, targets, _orig=metrics.strict_argmax_correct):  # epoch 0's object logits, digested
        digest.update(logits.detach().float().cpu().numpy().tobytes())
        return _orig(logits, targets)

    metrics.strict_argmax_correct = judged

    class Epoch0(Callback):
        def on_report(self, r):
            if r.index == 0:
                self.logits = digest.hexdigest()[:16]

    results: dict = {}
    res_file = out / f"cases_{precision}.json"
    phi = out / "meta" / "phi"
    cases = dict(CORRECTNESS, **({"planted/failure": PLANTED} if plant else {}))
    for name, overrides in cases.items():
        if name == "params/qlora" and (device == "cpu" or not torch.cuda.is_available()):
            results[name] = {"status": "skipped", "reason": "needs CUDA and bitsandbytes"}
            continue
        if name == "params/qlora":
            import importlib.util

            if importlib.util.find_spec("bitsandbytes") is None:
                results[name] = {"status": "skipped", "reason": "bitsandbytes is not installed here"}
                continue
        if "{phi}" in " ".join(overrides) and not (phi / "phi.json").is_file():
            results[name] = {"status": "failed", "error": "no φ: the bf16 meta-training of phase A failed"}
            continue
        t, digest = time.monotonic(), hashlib.sha256()
        cb = Epoch0()
        try:
            cfg = load_config(None, TINY + [f"device={device}", f"train.precision={precision}"]
                              + [o.format(phi=phi) for o in overrides])
            m = continual_update(cfg, callbacks=[cb])
            results[name] = {"status": "ok", "seconds": round(time.monotonic() - t, 2), "train_loss": m["train_loss"][-1],
                             "epoch0": {k: m[k][0] for k in ("to_learn_acc", "ntf_acc", "to_learn_em", "ntf_em",
                                                             "to_learn_per_fact", "ntf_per_fact")},
                             "epoch0_logits": getattr(cb, "logits", None)}
        except Exception as e:  # noqa: BLE001 (a case's failure is a result)
            results[name] = {"status": "failed", "error": "".join(traceback.format_exception_only(e))[-800:]}
        tmp = res_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, res_file)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phases", nargs="*", metavar="PHASE", help="A, B and/or C (default: all three)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--scale", choices=["full", "dry"], default="full")
    ap.add_argument("--plant", action="store_true", help="add a case that must fail to every phase")
    ap.add_argument("--child", choices=["fp32", "bf16"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.child:
        child(args.child, args.device, args.out, args.plant)
        return
    phases = args.phases or ["A", "B", "C"]
    if not set(phases) <= {"A", "B", "C"}:
        ap.error(f"unknown phase(s) {', '.join(sorted(set(phases) - {'A', 'B', 'C'}))}: A, B or C")
    c = Check(args.out, args.device, args.scale, args.plant)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))  # a `timeout` around us: stop the cases (finally)
    ok = True
    try:
        for name in phases:
            ok &= c.run_phase(name, {"A": c.correctness, "B": c.table9, "C": c.bench}[name])
    finally:
        c.gpu.stop()
        for p in c.procs:
            if p.poll() is None:
                stop_group(p)
        c.save()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
