"""Cost of one Train-Attention meta-step relative to one plain fine-tuning step on the same examples.

    python bench/meta_step.py [--model tiny|smollm2-135m] [--batch 8] [--repeats 3] [--runs 3] [--chunk 4]

A plain step: forward, backward and AdamW on θ's trainable set, uniform weights, the batch's documents
in one forward. A meta-step (dummy_loop 1, inner_steps 1, AdamW inner optimizer, phi_loss): φ's
weights, the first-order dummy update, the differentiable update, the probe objective and the
second-order backward to φ, plus AdamW on φ: ``meta`` with the whole meta-batch vmapped
(meta.batching=vmap), ``meta_chunked`` vmapped in groups of ``--chunk`` examples (meta.vmap_chunk),
``meta_sequential`` one example at a time. Each mode runs in its own subprocess so that the peak resident
memory (ru_maxrss above the post-setup baseline) is its own; a step's time is the median of ``--repeats``
after a warm-up. The whole set of modes runs ``--runs`` times: every ratio is taken within one run (the
machine's load drifts between runs), and the JSON keeps each run's ratios, their median and range.
Writes bench/results/meta_step_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch


def _setup(model: str, batch: int, max_length: int, batching: str = "vmap", chunk: int | None = None):
    from trainables.config import load_config
    from trainables.meta import MetaConfig, prepare_meta

    overrides = [f"model.name={model}", "params.kind=lora", "params.r=16", "params.dropout=0.0",
                 f"meta.max_length={max_length}", f"data.max_doc_tokens={max_length}", "meta.pool_size=40",
                 "meta.val_size=4", "meta.dummy_loop=1", "meta.inner_steps=1", "meta.inner_optimizer=adamw",
                 "data.split=tailored", "phi.num_layers=" + ("1" if model == "tiny" else "6"),
                 f"meta.batching={batching}"] + ([f"meta.vmap_chunk={chunk}"] if chunk else [])
    cfg = load_config(None, overrides, schema=MetaConfig)
    s = prepare_meta(cfg)
    return cfg, s, s.inner, s.train[:batch]


def child(mode: str, model: str, batch: int, repeats: int, max_length: int, chunk: int) -> dict:
    from trainables.encode import EncodedDoc, collate
    from trainables.loss import token_nll, weighted_loss
    from trainables.bilevel import meta_gradient
    from trainables.train_attention import phi_trainable

    cfg, s, inner, examples = _setup(model, batch, max_length, "sequential" if mode == "meta_sequential" else "vmap",
                                     chunk if mode == "meta_chunked" else None)
    theta = s.theta.model
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if mode in ("plain", "plain_sequential"):
        for p in theta.parameters():
            p.requires_grad_(False)
        params = [p for n, p in theta.named_parameters() if n in inner.theta0]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=1e-4)
        docs = [EncodedDoc(ex.doc["input_ids"][0].tolist(), ex.doc["object_mask"][0].tolist()) for ex in examples]
        # plain: the batch in one forward; plain_sequential: one example at a time (as the meta-step goes)
        groups = [docs] if mode == "plain" else [[d] for d in docs]
        batches = [collate(g, s.tokenizer.pad_token_id) for g in groups]

        def step():
            opt.zero_grad()
            for b in batches:
                out = theta(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                nll = token_nll(out.logits, b["input_ids"], b["attention_mask"])
                w = (b["attention_mask"][:, 1:] * b["attention_mask"][:, :-1]).float()
                (weighted_loss(nll, w) / len(batches)).backward()
            opt.step()
    else:
        phi = s.phi
        opt = torch.optim.AdamW(list(phi_trainable(phi).values()), lr=2e-4)

        def step():
            _, grads = meta_gradient(inner, phi, examples)
            for k, p in phi_trainable(phi).items():
                p.grad = grads[k]
            opt.step()
            opt.zero_grad()
    step()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode, "seconds": sorted(times)[len(times) // 2], "all_seconds": times,
            "peak_rss_above_baseline_mb": (peak - base_rss) / 1024,
            "tokens_per_doc": [int(ex.doc["attention_mask"].sum()) for ex in examples]}


MODES = ("plain", "plain_sequential", "meta", "meta_chunked", "meta_sequential")


def ratios(res: dict) -> dict:
    plain_t, plain_m = res["plain"]["seconds"], max(res["plain"]["peak_rss_above_baseline_mb"], 1e-9)
    out = {"time_ratio_vs_plain_sequential": res["meta"]["seconds"] / res["plain_sequential"]["seconds"]}
    for mode in ("meta", "meta_chunked", "meta_sequential"):
        out[f"{mode}_time_ratio"] = res[mode]["seconds"] / plain_t
        out[f"{mode}_memory_ratio"] = res[mode]["peak_rss_above_baseline_mb"] / plain_m
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--child", choices=MODES)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.batch, args.repeats, args.max_length, args.chunk)))
        return
    runs = []
    for run in range(args.runs):
        res = {}
        for mode in MODES:
            r = subprocess.run([sys.executable, __file__, "--child", mode, "--model", args.model, "--batch",
                                str(args.batch), "--repeats", str(args.repeats), "--max-length", str(args.max_length),
                                "--chunk", str(args.chunk)], capture_output=True, text=True, check=True)
            res[mode] = json.loads(r.stdout.strip().splitlines()[-1])
            print(run, mode, {k: v for k, v in res[mode].items() if k != "tokens_per_doc"}, flush=True)
        runs.append({"ratios": ratios(res), **res})
        print(run, runs[-1]["ratios"], flush=True)
    summary = {}
    for k in runs[0]["ratios"]:
        vals = sorted(r["ratios"][k] for r in runs)
        summary[k] = {"median": vals[len(vals) // 2], "min": vals[0], "max": vals[-1], "runs": vals}
    out = args.out or Path(__file__).parent / "results" / f"meta_step_{args.model}.json"
    from trainables.checkpoint import write_json_atomic

    write_json_atomic(out, {
        "benchmark": "meta-step / plain fine-tuning step (dummy_loop 1, inner_steps 1, AdamW inner, phi_loss)",
        "model": args.model, "batch": args.batch, "chunk": args.chunk, "max_length": args.max_length,
        "summary": summary, "runs": runs,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "device": "cpu", "torch_threads": torch.get_num_threads()},
    })
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
