"""A behaviour snapshot of the learning code on the `tiny` preset: every loop and every registered component,
each run's numbers and a digest of its final weights, as JSON. Run it before and after a refactor (or a
throughput change that must not move fp32 results) and compare the two files: they must be equal.

    python bench/snapshot_tiny.py --out /tmp/before.json          # on the old code
    python bench/snapshot_tiny.py --out /tmp/after.json           # on the new code
    python bench/snapshot_tiny.py --compare /tmp/before.json /tmp/after.json

Cases: the continual loop with every weighting scheme, parameterisation, regulariser and replay method (2
epochs), a crash-and-resume of it, meta-training (vmapped and one example at a time), and TemporalWiki (with and
without replay). CPU, 1 torch thread, deterministic. Not a timing: bench/ holds it because it writes JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.split=release", "data.to_learn_size=8", "data.ntf_size=8", "data.max_doc_tokens=64",
        "train.epochs=2", "train.batch_size=4", "train.lr=1e-3", "train.max_length=64",
        "params.kind=lora", "params.r=4", "params.dropout=0.1", "eval.batch_size=16", "device=cpu"]
CONTINUAL = {
    "uniform": [], "oracle": ["weighting.scheme=oracle"], "known_mask": ["weighting.scheme=known_mask"],
    "rho1": ["weighting.scheme=rho1"], "random": ["weighting.scheme=random"],
    "random_match_oracle": ["weighting.scheme=random", "weighting.random.match=oracle"],
    "random_uniform": ["weighting.scheme=random", "weighting.random.mode=uniform"],
    "full": ["params.kind=full"], "kadapter": ["params.kind=kadapter", "params.kadapter.bottleneck=8"],
    "recadam": ["regularizer.kind=recadam", "regularizer.recadam.pretrain_coef=100"],
    "ewc": ["regularizer.kind=ewc", "regularizer.ewc.batches=1"],
    "mix_review": ["replay.kind=mix_review", "replay.size=8"],
    "gere": ["replay.kind=gere", "replay.size=8"], "gere_kl": ["replay.kind=gere", "replay.gere.loss=kl", "replay.size=8"],
    "seekr": ["replay.kind=seekr", "replay.size=8", "replay.seekr.head_budget=2", "replay.seekr.probe_batches=1"],
    "sgd": ["train.optimizer=sgd", "train.lr=0.1"],
}
PHI_SCHEMES = {"train_attention": ["weighting.scheme=train_attention"],
               "taalm_known_mask": ["weighting.scheme=train_attention*known_mask"],
               "taalm_mix_review": ["weighting.scheme=train_attention", "replay.kind=mix_review", "replay.size=8"]}
META = ["meta.steps=4", "meta.val_every=2", "meta.pool_size=12", "meta.batch_size=4", "device=cpu"]


def digest(tensors: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def _clean(x):
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items() if k not in ("wall_seconds", "train_tokens_per_second", "config",
                                                                  "step_seconds", "seconds", "phi_dir", "data_dir")}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    if isinstance(x, float):
        return float.hex(x)  # exact
    return x


def continual_case(overrides: list[str], out: Path) -> dict:
    from trainables.config import load_config
    from trainables.continual import continual_update, prepare_run

    cfg = load_config(None, TINY + overrides)
    setup = prepare_run(cfg)
    m = continual_update(cfg, out_dir=out, setup=setup)
    return {"metrics": _clean(m), "weights": digest(setup.trainable)}


def resume_case(out: Path) -> dict:
    """Crash after epoch 1 (as tests/test_continual.py does), then resume: the resumed run's numbers."""
    from trainables.config import load_config
    from trainables.continual import continual_update, prepare_run

    try:
        from trainables.loop import Callback
    except ImportError:  # before the loops shared one protocol
        from trainables.continual import Callback
    cfg = load_config(None, TINY + ["weighting.scheme=random", "train.epochs=3"])

    class Crash(Callback):
        def on_step(self, *a, **k):
            unit = a[0] if a else k.get("unit", k.get("epoch"))
            if unit == 2:
                raise RuntimeError("crash")

    try:
        continual_update(cfg, out_dir=out, callbacks=[Crash()])
    except RuntimeError:
        pass
    setup = prepare_run(cfg)
    m = continual_update(cfg, out_dir=out, setup=setup)
    return {"metrics": _clean(m), "weights": digest(setup.trainable)}


def meta_case(overrides: list[str], out: Path) -> dict:
    from trainables.config import load_config
    from trainables.meta import MetaConfig, meta_train

    cfg = load_config(ROOT / "examples" / "meta_tiny.yaml", META + overrides, schema=MetaConfig)
    m = meta_train(cfg, out_dir=out)
    from safetensors.torch import load_file

    return {"metrics": _clean(m), "phi": digest(load_file(str(out / "phi" / "phi.safetensors")))}


def temporalwiki_case(overrides: list[str], out: Path) -> dict:
    from trainables.config import load_config
    from trainables.temporalwiki import TemporalWikiConfig, resolve_paths, temporalwiki_run

    path = ROOT / "examples" / "temporalwiki_tiny.yaml"
    cfg = resolve_paths(load_config(path, ["device=cpu"] + overrides, schema=TemporalWikiConfig), path.parent)
    m = temporalwiki_run(cfg, out_dir=out)
    return {"metrics": _clean(m)}


def snapshot() -> dict:
    torch.set_num_threads(1)
    res: dict = {}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        for name, ov in CONTINUAL.items():
            res[f"continual/{name}"] = continual_case(ov, d / name)
            print(name, file=sys.stderr)
        res["continual/resume"] = resume_case(d / "resume")
        res["meta/vmap"] = meta_case([], d / "meta_vmap")
        res["meta/sequential"] = meta_case(["meta.batching=sequential"], d / "meta_seq")
        res["meta/change3"] = meta_case(["meta.objective=change3", "meta.inner_optimizer=sgd", "meta.inner_lr=0.5"],
                                        d / "meta_change3")
        phi = str(d / "meta_vmap" / "phi")
        for name, ov in PHI_SCHEMES.items():
            res[f"continual/{name}"] = continual_case(ov + [f"weighting.train_attention.phi={phi}"], d / name)
        res["temporalwiki/plain"] = temporalwiki_case([], d / "tw")
        pool = ROOT / "tests" / "fixtures" / "temporalwiki" / "0910.jsonl"
        res["temporalwiki/mix_review"] = temporalwiki_case(["replay.kind=mix_review", f"replay.pool={pool}"],
                                                           d / "tw_mix")
        print("done", file=sys.stderr)
    return res


def compare(a: dict, b: dict) -> list[str]:
    diffs = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            diffs.append(k)
    return diffs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--compare", nargs=2, type=Path)
    args = ap.parse_args()
    if args.compare:
        a, b = (json.loads(p.read_text()) for p in args.compare)
        diffs = compare(a, b)
        print(f"{len(a)} / {len(b)} cases; differing: {diffs or 'none'}")
        sys.exit(1 if diffs else 0)
    out = snapshot()
    args.out.write_text(json.dumps(out, indent=1, sort_keys=True))
    print(f"{len(out)} cases -> {args.out}")


if __name__ == "__main__":
    main()
