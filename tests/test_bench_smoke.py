"""Every bench script runs from an empty cache (issue 30 item 6): each at its smallest size, in a process of its own
whose TAALM_CACHE is a new empty folder, writing its JSON under the test's folder (never bench/results/). What is
checked is that it runs through and writes what it says, not its figures (timings are never asserted in tests).
bench/orchestration.py crashed this way (its warm-up ran no meta stage, so its direct TAALM runs found no φ) while
every recorded figure had been taken with --skip-grid.

Not here: bench/gpu_check.py phases B and C (SmolLM2 on full LAMA-CKL; their CPU dry runs are in docs/RESULTS.md
"GPU"), bench/storage.py --cluster (the namespace cluster: tests/test_cluster_nodes.py runs the same parts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

# name -> (argv after the script, the JSON it writes relative to the test folder: OUT is the folder)
BENCHES = {
    "throughput": (["bench/throughput.py", "--cases", "tiny/lora", "--steps", "2", "--batch-size", "2",
                    "--max-length", "32", "--out", "OUT/throughput.json"], "throughput.json"),
    "profile_step": (["bench/profile_step.py", "--case", "tiny/lora", "--steps", "1", "--batch-size", "2",
                      "--max-length", "32", "--out", "OUT/profile.json"], "profile.json"),
    "meta_step": (["bench/meta_step.py", "--model", "tiny", "--batch", "2", "--chunk", "2", "--repeats", "1",
                   "--runs", "1", "--out", "OUT/meta_step.json"], "meta_step.json"),
    "memory_estimate": (["bench/memory_estimate.py", "--cases", "runtime,tiny", "--out", "OUT/memory.json"],
                        "memory.json"),
    "eval_precision": (["bench/eval_precision.py", "--model", "tiny", "--facts", "4", "--split", "release",
                        "--out", "OUT/eval_precision.json"], "eval_precision.json"),
    "bootstrap_coverage": (["bench/bootstrap_coverage.py", "--datasets", "3", "--n-boot", "50", "--seeds", "1",
                            "--settings", "TAALM-like", "--out", "OUT/coverage.json"], "coverage.json"),
    "temporalwiki_data": (["bench/temporalwiki_data.py", "--sizes", "200", "--repeats", "1", "--max-docs", "8",
                           "--work", "OUT/tw", "--json", "OUT/tw.json"], "tw.json"),
    "storage": (["bench/storage.py", "--repeats", "1", "--epochs", "1", "--out", "OUT/storage.json"], "storage.json"),
    "orchestration": (["bench/orchestration.py", "--runs", "1", "--epochs", "1", "--to-learn", "4", "--grid-epochs",
                       "1", "--skip-ray-train", "--out", "OUT/orchestration.json"], "orchestration.json"),
    "snapshot_tiny": (["bench/snapshot_tiny.py", "--out", "OUT/snapshot.json"], "snapshot.json"),
    "gpu_check_dry_A": (["bench/gpu_check.py", "A", "--device", "cpu", "--scale", "dry", "--out", "OUT/gpu"],
                        "gpu/summary.json"),
}


@pytest.mark.integration
@pytest.mark.parametrize("name", list(BENCHES))
def test_each_bench_runs_from_an_empty_cache(tmp_path, name):
    argv, written = BENCHES[name]
    out = tmp_path / "out"
    out.mkdir()
    cache = tmp_path / "cache"  # empty: nothing from an earlier run or the developer's cache
    env = dict(os.environ, TAALM_CACHE=str(cache), PYTHONPATH=str(ROOT))
    env.pop("RAY_ADDRESS", None)
    args = [a.replace("OUT", str(out)) for a in argv]
    r = subprocess.run([PY, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{name}: exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    path = out / written
    assert path.is_file(), (name, sorted(str(p.relative_to(out)) for p in out.rglob("*"))[:40])
    data = json.loads(path.read_text())
    assert data, name
