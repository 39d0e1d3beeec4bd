"""The TemporalWiki data path at realistic sizes: tokenization throughput and peak resident memory.

For each size (generated diff sets, bench/temporalwiki_generate.py, CSV as TWiki-Diffsets publishes them), each in a
fresh process with an empty cache:
  * tokenize: the whole diff set into its Arrow cache (documents/s, the process's peak RSS, the entry's size);
  * read: one epoch's batches over that whole cache in the seeded order, as a period without max_docs_per_period
    reads them (peak RSS: the mapped pages are bounded by twdata.REMAP_EVERY, not the file);
  * trial: one TemporalWiki period on the tiny preset with max_docs_per_period documents (the run a small machine
    makes), cache empty (the sample tokenized) and then warm (reused), peak RSS and wall time.

    .venv/bin/python bench/temporalwiki_data.py --sizes 10000 100000 --repeats 2     # -> bench/results/temporalwiki_data.json
    .venv/bin/python bench/temporalwiki_data.py trial --diff FILE --max-docs 64       # one measurement, JSON on stdout
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _tokenizer():
    from trainables.config import ModelConfig
    from trainables.models import load_tokenizer

    return load_tokenizer(ModelConfig())


def cmd_tokenize(a) -> dict:
    from trainables import twdata

    tok = _tokenizer()
    base = peak_rss()
    t = time.perf_counter()
    ds = twdata.prepare_diff(Path(a.diff), tok, text_column="text", max_length=a.max_length, long_docs="truncate",
                             filter="taalm", sample=None, where="bench")
    wall = time.perf_counter() - t
    m = ds.manifest
    return {"rows": m["n_rows"], "docs": m["n_docs"], "tokens": m["tokens"], "seconds": wall,
            "docs_per_s": m["n_docs"] / wall, "tokens_per_s": m["tokens"] / wall,
            "entry_bytes": sum(f.stat().st_size for f in ds.entry.iterdir()), "peak_rss": peak_rss(),
            "rss_before": base, "n_truncated": m["n_truncated"], "tokens_cut": m["tokens_cut"]}


def cmd_read(a) -> dict:
    from trainables import twdata
    from trainables.temporalwiki import period_order

    tok = _tokenizer()
    ds = twdata.prepare_diff(Path(a.diff), tok, text_column="text", max_length=a.max_length, long_docs="truncate",
                             filter="taalm", sample=None, where="bench")
    base = peak_rss()
    order, n_batches = period_order(len(ds), a.batch_size, 7919)
    t = time.perf_counter()
    n = 0
    for step in range(n_batches):
        n += len(ds.take(order[step * a.batch_size:(step + 1) * a.batch_size].tolist()))
    wall = time.perf_counter() - t
    return {"docs": n, "batches": n_batches, "seconds": wall, "batches_per_s": n_batches / wall,
            "peak_rss": peak_rss(), "rss_before": base}


def cmd_trial(a) -> dict:
    import torch

    from trainables.config import load_config
    from trainables.temporalwiki import TemporalWikiConfig, prepare_temporalwiki, resolve_paths, temporalwiki_run

    torch.set_num_threads(1)
    example = ROOT / "examples" / "temporalwiki_tiny.yaml"
    cfg = resolve_paths(load_config(example, [
        "device=cpu", f'temporalwiki.periods=[{{name: "0910", diff: "{Path(a.diff).resolve()}"}}]',
        f"temporalwiki.max_docs_per_period={a.max_docs}", "temporalwiki.filter=taalm",
        f"train.max_length={a.trial_max_length}"], schema=TemporalWikiConfig), example.parent)
    t = time.perf_counter()
    start = peak_rss()
    setup = prepare_temporalwiki(cfg)  # tokenizer, the period's data (streamed, sampled, tokenized), θ
    setup_peak = peak_rss()
    m = temporalwiki_run(cfg, out_dir=a.out, setup=setup)
    p = m["periods"][0]
    return {"seconds": time.perf_counter() - t, "peak_rss": peak_rss(), "start_rss": start, "setup_peak_rss": setup_peak,
            "n_docs": p["n_docs"],
            "cache": p["data"]["cache"], "train_loss": p["train_loss"], "changed_ppl": p["changed_ppl"],
            "unchanged_ppl": p["unchanged_ppl"]}


def run_child(*args: str, cache: Path) -> dict:
    """One measurement in a fresh process (its own peak RSS), with TAALM_CACHE at ``cache``."""
    env = dict(os.environ, TAALM_CACHE=str(cache))
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode:
        raise RuntimeError(f"{args}: exit {r.returncode}\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench(a) -> dict:
    from bench.temporalwiki_generate import generate

    work = Path(a.work or tempfile.mkdtemp(prefix="twbench"))
    res = {"machine": f"{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}",
           "model": "tiny (SmolLM2 tokenizer)", "max_length": a.max_length, "trial_max_length": a.trial_max_length,
           "max_docs_per_period": a.max_docs,
           "batch_size": a.batch_size, "repeats": a.repeats, "full_max": a.full_max, "sizes": {}}
    for n in a.sizes:
        diff = work / f"diff_{n}.csv"
        if not diff.exists():
            t = time.perf_counter()
            generate(diff, n, seed=0)
            print(f"generated {n} rows in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        runs = []
        for r in range(a.repeats):
            cache = work / f"cache_{n}_{r}"
            shutil.rmtree(cache, ignore_errors=True)
            common = ["--diff", str(diff), "--max-length", str(a.max_length)]
            one = {} if n > a.full_max else {
                "tokenize": run_child("tokenize", *common, cache=cache),
                "read": run_child("read", *common, "--batch-size", str(a.batch_size), cache=cache)}
            tcache = work / f"tcache_{n}_{r}"
            shutil.rmtree(tcache, ignore_errors=True)
            for phase in ("cold", "warm"):
                one[f"trial_{phase}"] = run_child("trial", *common, "--max-docs", str(a.max_docs), "--out",
                                                  str(work / f"out_{n}_{r}_{phase}"), cache=tcache)
            runs.append(one)
            shutil.rmtree(cache, ignore_errors=True)
            shutil.rmtree(tcache, ignore_errors=True)
            print(n, json.dumps({k: {kk: vv for kk, vv in v.items() if kk in ("docs_per_s", "peak_rss", "seconds")}
                                 for k, v in one.items()}), file=sys.stderr)
        summary = {}
        for part in runs[0]:
            for key in ("docs_per_s", "peak_rss", "seconds", "entry_bytes"):
                vals = [r[part][key] for r in runs if key in r[part]]
                if vals:
                    summary[f"{part}.{key}"] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
        res["sizes"][str(n)] = {"file_bytes": diff.stat().st_size, "runs": runs, "summary": summary}
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=1))  # what is measured so far
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cmd", nargs="?", default="bench", choices=["bench", "tokenize", "read", "trial"])
    ap.add_argument("--diff")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--max-docs", type=int, default=64)
    ap.add_argument("--trial-max-length", type=int, default=64, help="the trial's train.max_length (tiny's example)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--full-max", type=int, default=10**9,
                    help="sizes above this skip the whole-file tokenize / read (their cost: rows / the measured rate)")
    ap.add_argument("--work", help="where the generated files and caches go (default: a new temporary folder)")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "temporalwiki_data.json")
    a = ap.parse_args()
    if a.cmd != "bench":
        print(json.dumps({"tokenize": cmd_tokenize, "read": cmd_read, "trial": cmd_trial}[a.cmd](a)))
        return 0
    res = bench(a)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(res, indent=1))
    print(f"-> {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
