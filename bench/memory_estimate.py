"""The memory estimate (orchestrator/memory.py) against measured peaks.

    python bench/memory_estimate.py [--cases tiny,smollm2,meta_tiny] [--out bench/results/memory_estimate.json]

Each case runs in a child process of its own, one after another (never two at once): the loop of a trial for one
epoch (one meta-step check for meta-training) the way a lean trial runs it (torch threads 1, the warm process's
kept copy of the base weights), then the child reads its peak resident memory (``ru_maxrss``). ``runtime`` is the
same child importing what a trial imports (torch, transformers, Ray, the loops) and loading the tokenizer only; the
formula's R (RUNTIME_GB) is that inside a Ray worker (the ``ray_runtime`` case: a fresh worker of a local instance doing
the same; RUNTIME_GB is its figure, tests/test_docs_figures.py checks it against the JSON), so each case's error compares the
estimate with R replaced by this child's runtime. Memory, not time: the numbers do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = {
    "runtime": None,
    "ray_runtime": None,  # R itself: a Ray worker of a local instance doing what "runtime" does (RUNTIME_GB)
    "tiny": (["model.name=tiny", "params.kind=full", "data.split=release", "data.to_learn_size=8", "data.ntf_size=8",
              "data.max_doc_tokens=64", "train.epochs=1", "train.batch_size=4", "train.max_length=64",
              "eval.batch_size=16"], "continual"),
    "smollm2": (["model.name=smollm2-135m", "params.kind=lora", "params.r=16", "params.alpha=32", "params.dropout=0.0",
                 "data.split=release", "data.to_learn_size=16", "data.ntf_size=16", "data.max_doc_tokens=64",
                 "train.epochs=1", "train.batch_size=8", "train.max_length=64", "eval.batch_size=32"], "continual"),
    "meta_tiny": ([], "meta"),
    "meta_tiny_b2": (["meta.batch_size=2"], "meta"),
    "meta_tiny_b8": (["meta.batch_size=8"], "meta"),
    "meta_tiny_seq": (["meta.batching=sequential"], "meta"),
    "meta_tiny_t24": (["meta.max_length=24"], "meta"),
    "meta_tiny_val2": (["meta.val_batch_size=2"], "meta"),
}


def _runtime_in_worker() -> float:
    import resource

    import torch

    torch.set_num_threads(1)
    import ray.train  # noqa: F401  (a Tune trial's actor has Tune and Train imported)
    import ray.tune  # noqa: F401

    import orchestrator.ray_trainables  # noqa: F401  (the trial driver, as a trial's worker imports it)
    from trainables.config import ModelConfig
    from trainables.continual import continual_update  # noqa: F401
    from trainables.meta import meta_train  # noqa: F401
    from trainables.models import load_tokenizer

    load_tokenizer(ModelConfig(name="tiny"))
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 3)


def ray_worker_runtime() -> float:
    """The peak RSS (GB) of a fresh Ray worker (a local instance of one CPU, the worker's environment as a trial's)
    after it imported what a trial imports and loaded the tokenizer: the formula's R (RUNTIME_GB)."""
    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}})
    try:
        return ray.get(ray.remote(num_cpus=1)(_runtime_in_worker).remote())
    finally:
        ray.shutdown()


def child(case: str) -> None:
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray  # noqa: F401  (a trial's process has Ray imported)
    import torch

    torch.set_num_threads(1)
    from trainables.config import load_config
    from trainables.continual import continual_update
    from trainables.meta import MetaConfig, meta_train
    from trainables.models import keep_base_weights, load_tokenizer

    from orchestrator.memory import estimate_meta, estimate_trial

    out = {}
    if case == "ray_runtime":
        out["peak_rss_gb"] = ray_worker_runtime()
        print("RESULT " + json.dumps(out))
        return
    if CASES[case] is None:
        from trainables.config import ModelConfig

        load_tokenizer(ModelConfig(name="tiny"))
    else:
        overrides, kind = CASES[case]
        keep_base_weights(2 * 2 ** 30)
        with tempfile.TemporaryDirectory() as d:
            if kind == "meta":
                cfg = load_config(ROOT / "examples" / "meta_tiny.yaml", ["meta.steps=3", "meta.val_every=3"] + overrides,
                                  schema=MetaConfig)
                meta_train(cfg, out_dir=Path(d), resume=False)
                est = estimate_meta(cfg.model_dump(mode="json"))
            else:
                cfg = load_config(None, overrides)
                continual_update(cfg, out_dir=Path(d), resume=False)
                est = estimate_trial(cfg.model_dump(mode="json"))
        out["estimate_gb"] = round(est.gb, 3)
        out["parts_gb"] = {k: round(v / 2 ** 30, 3) for k, v in est.parts.items()}
    out["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 3)
    print("RESULT " + json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "memory_estimate.json"))
    ap.add_argument("--child")
    a = ap.parse_args()
    if a.child:
        child(a.child)
        return
    results = {}
    for case in a.cases.split(","):
        r = subprocess.run([sys.executable, __file__, "--child", case], capture_output=True, text=True, cwd=ROOT)
        line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(case, "failed:", r.stderr[-2000:], file=sys.stderr)
            continue
        results[case] = json.loads(line[7:])
        m = results[case]
        if "estimate_gb" in m and "runtime" in results:
            # the estimate's R is a Ray worker's; these children are plain processes: compare like with like
            from orchestrator.memory import RUNTIME_GB

            m["estimate_plain_gb"] = round(m["estimate_gb"] - RUNTIME_GB + results["runtime"]["peak_rss_gb"], 3)
            m["error"] = round(m["estimate_plain_gb"] / m["peak_rss_gb"] - 1, 3)
        print(case, m, flush=True)
    from trainables.checkpoint import write_json_atomic

    write_json_atomic(Path(a.out), {"python": sys.version.split()[0], "cases": results,
                                    "note": "peak resident memory (ru_maxrss) of one child process per case; error = "
                                            "estimate / measured - 1"})


if __name__ == "__main__":
    main()
