"""Cost of one Train-Attention meta-step relative to one plain fine-tuning step on the same examples.

    python bench/meta_step.py [--model tiny|smollm2-135m] [--batch 8] [--repeats 3] [--runs 3] [--chunk 4]
                              [--device cpu|cuda] [--precision fp32|bf16] [--modes plain meta ...]

A plain step: forward, backward and AdamW on θ's trainable set, uniform weights, the batch's documents
in one forward. A meta-step (dummy_loop 1, inner_steps 1, AdamW inner optimizer, phi_loss): φ's
weights, the first-order dummy update, the differentiable update, the probe objective and the
second-order backward to φ, plus AdamW on φ: ``meta`` with the whole meta-batch vmapped
(meta.batching=vmap), ``meta_chunked`` vmapped in groups of ``--chunk`` examples (meta.vmap_chunk),
``meta_sequential`` one example at a time. Each mode runs in its own subprocess so that the peak resident
memory is its own (CPU: ru_maxrss above the post-setup baseline; CUDA: torch.cuda.max_memory_allocated over the
timed steps); a step's time is the median of ``--repeats`` after a warm-up, synchronised with the device. Each
mode also reports tokens/s (the documents' real tokens per step) and, for the plain step, the fraction of the
device's peak FLOP/s (bench/common.py: the FLOP count and the peak measured with a large matmul in the run). The whole set of modes runs ``--runs`` times: every ratio is taken within one run (the
machine's load drifts between runs), and the JSON keeps each run's ratios, their median and range.
Writes bench/results/meta_step_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch


def _setup(model: str, batch: int, max_length: int, batching: str = "vmap", chunk: int | None = None,
           device: str = "cpu", precision: str = "fp32"):
    from trainables.config import load_config
    from trainables.meta import MetaConfig, prepare_meta

    overrides = [f"model.name={model}", "params.kind=lora", "params.r=16", "params.dropout=0.0",
                 f"meta.max_length={max_length}", f"data.max_doc_tokens={max_length}", "meta.pool_size=40",
                 "meta.val_size=4", "meta.dummy_loop=1", "meta.inner_steps=1", "meta.inner_optimizer=adamw",
                 "data.split=tailored", "phi.num_layers=" + ("1" if model == "tiny" else "6"),
                 f"meta.batching={batching}", f"device={device}", f"meta.precision={precision}"] + \
        ([f"meta.vmap_chunk={chunk}"] if chunk else [])
    cfg = load_config(None, overrides, schema=MetaConfig)
    s = prepare_meta(cfg)
    return cfg, s, s.inner, s.train[:batch]


def child(mode: str, model: str, batch: int, repeats: int, max_length: int, chunk: int, device: str = "cpu",
          precision: str = "fp32") -> dict:
    from common import peak_memory_mb, reset_peak_memory, timed, train_step_flops
    from trainables.encode import EncodedDoc, collate
    from trainables.loss import token_nll, weighted_loss
    from trainables.bilevel import meta_gradient
    from trainables.train_attention import phi_trainable

    cfg, s, inner, examples = _setup(model, batch, max_length, "sequential" if mode == "meta_sequential" else "vmap",
                                     chunk if mode == "meta_chunked" else None, device, precision)
    from trainables.step import autocast
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
        batches = [{k: v.to(s.device) for k, v in collate(g, s.tokenizer.pad_token_id).items()} for g in groups]

        def step():
            opt.zero_grad()
            for b in batches:
                with autocast(s.device, precision):
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
    reset_peak_memory(s.device)
    times = []
    for _ in range(repeats):
        t: dict = {}
        with timed(s.device, t):
            step()
        times.append(t["seconds"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = sorted(times)[len(times) // 2]
    tokens = sum(int(ex.doc["attention_mask"].sum()) for ex in examples)
    out = {"mode": mode, "device": str(s.device), "precision": precision, "seconds": seconds, "all_seconds": times,
           "tokens_per_second": tokens / seconds, "peak_rss_above_baseline_mb": (peak - base_rss) / 1024,
           **peak_memory_mb(s.device), "tokens_per_doc": [int(ex.doc["attention_mask"].sum()) for ex in examples]}
    if mode.startswith("plain"):
        context = max(int(ex.doc["attention_mask"].sum()) for ex in examples)
        flops = train_step_flops(theta, {k: v for k, v in theta.named_parameters() if k in inner.theta0}, tokens,
                                 context)
        out.update(flops=flops, flops_per_second=flops["flops"] / seconds)
    return out


MODES = ("plain", "plain_sequential", "meta", "meta_chunked", "meta_sequential")


def _memory(r: dict) -> float:
    """The mode's own peak memory: the GPU allocator's peak on CUDA, the RSS above the setup's on the CPU."""
    return r.get("gpu_peak_allocated_mb", r["peak_rss_above_baseline_mb"])


def ratios(res: dict) -> dict:
    out = {}
    if "plain" in res:
        plain_t, plain_m = res["plain"]["seconds"], max(_memory(res["plain"]), 1e-9)
        if "meta" in res and "plain_sequential" in res:
            out["time_ratio_vs_plain_sequential"] = res["meta"]["seconds"] / res["plain_sequential"]["seconds"]
        for mode in ("meta", "meta_chunked", "meta_sequential"):
            if mode in res:
                out[f"{mode}_time_ratio"] = res[mode]["seconds"] / plain_t
                out[f"{mode}_memory_ratio"] = _memory(res[mode]) / plain_m
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--modes", nargs="*", choices=MODES, default=list(MODES))
    ap.add_argument("--child", choices=MODES)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.batch, args.repeats, args.max_length, args.chunk,
                               args.device, args.precision)))
        return
    from common import datasheet_peak, machine, matmul_peak

    peak = matmul_peak(args.device, torch.bfloat16 if args.precision == "bf16" else torch.float32)
    sheet = datasheet_peak(args.device, args.precision)
    runs = []
    for run in range(args.runs):
        res = {}
        for mode in args.modes:
            r = subprocess.run([sys.executable, __file__, "--child", mode, "--model", args.model, "--batch",
                                str(args.batch), "--repeats", str(args.repeats), "--max-length", str(args.max_length),
                                "--chunk", str(args.chunk), "--device", args.device, "--precision", args.precision],
                               capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(f"{mode} failed:\n{r.stderr[-3000:]}")
            res[mode] = json.loads(r.stdout.strip().splitlines()[-1])
            if "flops_per_second" in res[mode]:
                res[mode]["fraction_of_measured_peak"] = res[mode]["flops_per_second"] / peak
                if sheet:
                    res[mode]["fraction_of_datasheet_peak"] = res[mode]["flops_per_second"] / sheet["flops"]
            print(run, mode, {k: v for k, v in res[mode].items() if k not in ("tokens_per_doc", "flops")}, flush=True)
        runs.append({"ratios": ratios(res), **res})
        print(run, runs[-1]["ratios"], flush=True)
    summary = {}
    for k in runs[0]["ratios"]:
        vals = sorted(r["ratios"][k] for r in runs)
        summary[k] = {"median": vals[len(vals) // 2], "min": vals[0], "max": vals[-1], "runs": vals}
    suffix = "" if args.device == "cpu" else f"_{args.device.replace(':', '')}"
    out = args.out or Path(__file__).parent / "results" / f"meta_step_{args.model}{suffix}.json"
    from trainables.checkpoint import write_json_atomic

    write_json_atomic(out, {
        "benchmark": "meta-step / plain fine-tuning step (dummy_loop 1, inner_steps 1, AdamW inner, phi_loss)",
        "model": args.model, "batch": args.batch, "chunk": args.chunk, "max_length": args.max_length,
        "precision": args.precision, "summary": summary, "runs": runs, "machine": machine(args.device),
        "peak_flops": {"measured_matmul": peak, "datasheet": sheet},
    })
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
