"""What a study's storage costs (issue 27 item 9), measured in one run so the ratios compare like with like:

1. **per checkpoint**: a trial's epoch checkpoint (the directory `trainables.checkpoint` writes: safetensors + JSON;
   the `tiny` preset's, and SmolLM2-135M LoRA r16's made up at its real tensor sizes) copied into the storage the
   way Tune persists it (`pyarrow.fs.copy_files`), to a local directory and to an S3-compatible server on loopback
   (moto's, started here), `--repeats` times each;
2. **per study**: the smoke grid (`ablations/smoke_tiny.yaml`, one trial, `--epochs` epochs) end to end with the
   storage in the study directory and on the S3 server, wall time per epoch;
3. **per trial on a cluster** (root only, `--cluster`): the same grid, two trials, on the namespace cluster of
   tests/nscluster.py (a head and two 1-CPU worker nodes, storage on S3) vs on this machine's local Ray.

    python bench/storage.py --out bench/results/storage.json [--repeats 5] [--epochs 3] [--cluster]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
VENV_BIN = Path(sys.executable).parent
AWS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_EC2_METADATA_DISABLED": "true"}


def _moto(port: int):
    env = dict(os.environ, **AWS)
    proc = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    from pyarrow import fs

    s3 = fs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                         access_key="bench", secret_key="bench", allow_bucket_creation=True)
    for _ in range(100):
        try:
            s3.create_dir("bench")
            return proc, s3
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("moto's server did not answer")


def _checkpoint_dir(tensors: dict, d: Path) -> float:
    """A checkpoint directory of these tensor shapes (safetensors + a JSON), its size in MB."""
    import torch
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.zeros(shape) for k, shape in tensors.items()}, str(d / "state.safetensors"))
    (d / "state.json").write_text(json.dumps({"epoch": 1, "history": {"to_learn_acc": [0.0] * 31}}))
    return sum(f.stat().st_size for f in d.iterdir()) / 2 ** 20


def _lora_shapes(layers: int, h: int, kv: int, m: int, r: int) -> dict:
    """LoRA A/B of every linear layer of a Llama body (peft's all-linear), with AdamW's two states each."""
    shapes = {}
    for i in range(layers):
        for name, (fan_in, fan_out) in {"q": (h, h), "k": (h, kv), "v": (h, kv), "o": (h, h), "gate": (h, m),
                                        "up": (h, m), "down": (m, h)}.items():
            for part, shape in (("A", (r, fan_in)), ("B", (fan_out, r))):
                for what in ("w", "m", "v"):
                    shapes[f"{i}.{name}.{part}.{what}"] = shape
    return shapes


def per_checkpoint(s3, port: int, repeats: int) -> dict:
    from pyarrow import fs

    out = {}
    cases = {"tiny": _lora_shapes(2, 64, 16, 128, 4), "smollm2-135m LoRA r16": _lora_shapes(30, 576, 192, 1536, 16)}
    with tempfile.TemporaryDirectory() as tmp:
        for name, shapes in cases.items():
            src = Path(tmp) / name.split()[0] / "checkpoint"
            mb = _checkpoint_dir(shapes, src)
            local, remote = [], []
            for i in range(repeats):
                dest = Path(tmp) / "storage" / f"{name.split()[0]}-{i}"
                dest.mkdir(parents=True)
                t = time.perf_counter()
                fs.copy_files(str(src), str(dest), source_filesystem=fs.LocalFileSystem(),
                              destination_filesystem=fs.LocalFileSystem())
                local.append(time.perf_counter() - t)
                t = time.perf_counter()
                fs.copy_files(str(src), f"bench/{name.split()[0]}-{i}/checkpoint",
                              source_filesystem=fs.LocalFileSystem(), destination_filesystem=s3)
                remote.append(time.perf_counter() - t)
            out[name] = {"checkpoint_mb": round(mb, 2), "local_dir_s": _stats(local), "s3_loopback_s": _stats(remote),
                         "s3_over_local_median": round(statistics.median(remote) / statistics.median(local), 2)}
    return out


def _stats(xs: list[float]) -> dict:
    return {"median": round(statistics.median(xs), 4), "min": round(min(xs), 4), "max": round(max(xs), 4),
            "n": len(xs)}


def _grid(args: list[str], env: dict) -> float:
    t = time.perf_counter()
    p = subprocess.run([str(VENV_BIN / "taalm"), "ablate", str(ROOT / "ablations" / "smoke_tiny.yaml"), *args],
                       capture_output=True, text=True, env=env, timeout=1800)
    if p.returncode != 0:
        raise SystemExit(f"taalm ablate failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return time.perf_counter() - t


def per_study(port: int, repeats: int, epochs: int) -> dict:
    env = dict(os.environ, **AWS)
    common = ["--num-cpus", "2", "--set", "axes={weighting.scheme: [oracle]}", "--set",
              f"overrides.train.epochs={epochs}"]
    local, remote = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            local.append(_grid(common + ["--out", f"{tmp}/l{i}"], env))
            uri = f"s3://bench/study{i}?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
            remote.append(_grid(common + ["--out", f"{tmp}/s{i}", "--storage", uri], env))
    diff = [(r - loc) / epochs for r, loc in zip(remote, local)]
    return {"grid": "smoke_tiny, one trial (Oracle), tiny preset", "epochs": epochs, "study_local_dir_s": _stats(local),
            "study_s3_loopback_s": _stats(remote), "s3_minus_local_per_epoch_s": _stats(diff)}


def per_trial_on_cluster(repeats: int, epochs: int) -> dict:
    from nscluster import RayLab, unavailable

    why = unavailable()
    if why:
        return {"skipped": why}
    common = ["--set", "axes={weighting.scheme: [uniform, oracle]}", "--set", f"overrides.train.epochs={epochs}",
              "--set", "resources.max_concurrent=2"]
    one, many = [], []
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, **AWS)
        for i in range(repeats):
            one.append(_grid(common + ["--num-cpus", "2", "--out", f"{tmp}/one{i}"], env))
        lab = RayLab(workers=2, worker_cpus=1, head_cache=Path(tmp) / "head-cache", s3=True).start()
        try:
            for i in range(repeats):
                t = time.perf_counter()
                p = lab.driver(["ablate", str(ROOT / "ablations" / "smoke_tiny.yaml"), "--address", lab.address,
                                "--out", f"{tmp}/lab{i}", "--storage", lab.s3_uri(f"lab{i}"), *common],
                               cwd=str(ROOT), timeout=1800)
                if p.returncode != 0:
                    raise SystemExit(f"the cluster's study failed:\n{p.stderr[-3000:]}")
                many.append(time.perf_counter() - t)
        finally:
            lab.stop()
    return {"grid": "smoke_tiny, two trials at once, tiny preset", "epochs": epochs,
            "one_machine_local_ray_s": _stats(one), "namespace_cluster_s3_s": _stats(many),
            "cluster_minus_one_machine_per_trial_s": round((statistics.median(many) - statistics.median(one)) / 2, 2),
            "note": "the cluster's first study builds each worker node's caches (its TAALM_CACHE starts empty)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "storage.json")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--cluster", action="store_true", help="also the namespace cluster (root)")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    from common import machine  # bench/common.py

    port = 9000 + os.getpid() % 500
    proc, s3 = _moto(port)
    try:
        result = {"machine": machine("cpu"), "repeats": a.repeats, "per_checkpoint": per_checkpoint(s3, port, a.repeats),
                  "per_study": per_study(port, a.repeats, a.epochs)}
    finally:
        proc.kill()
    if a.cluster:
        result["per_trial_on_a_cluster"] = per_trial_on_cluster(a.repeats, a.epochs)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, a.out)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
