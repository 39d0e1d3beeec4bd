"""Tailoring LAMA-CKL to a base model (ALGORITHM.md §3): score every fact with the model's own probe
accuracy, then split. Scores are cached per (model, data hash, task) so they are computed once.

The scores of the embedded model (``smollm2-135m``) on the shipped data are shipped too
(``data/tailor_scores/<cache key>.json``, written by ``python -m trainables.tailor ship``): a missing cache
entry is seeded from that file, after a check that the model in hand still computes the recorded logits
(so a library upgrade that moves the model's numbers makes it score the facts itself). Any other model,
data or task is scored and cached as before. ``python -m trainables.tailor check`` recomputes every shipped
file with :func:`score_facts` and compares."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Optional

from .checkpoint import exclusive, write_json_atomic
from .config import DataConfig, ModelConfig
from .data import REPO_ROOT, LamaCKL, Split, load_split_file, make_split, release_scores
from .encode import doc_token_count, encode_probes
from .metrics import probe_scores
from .models import cache_dir, model_key

log = logging.getLogger(__name__)

SHIPPED_SCORES = REPO_ROOT / "data" / "tailor_scores"
SHIPPED_FORMAT = "taalm-tailor-scores/1"
CHECK_FACTS = 8  # facts whose logits a shipped file records, to check the model in hand against
CHECK_RTOL = 1e-4  # relative tolerance of that check (float summation order may differ; other weights do not pass)


def score_facts(model, tokenizer, lama: LamaCKL, task: str, batch_size: int = 32,
                device="cpu", progress=None, only: Optional[set] = None) -> dict[str, float]:
    """Every fact's probe accuracy (``only``: the facts of these uuids)."""
    facts = [f for f in lama.all_facts() if only is None or f.uuid in only]
    probes = encode_probes(tokenizer, facts, task)
    scores = {}
    step = max(batch_size * 4, 1)
    for i in range(0, len(facts), step):
        res = probe_scores(model, probes[i:i + step], tokenizer.pad_token_id, batch_size, device)
        for f, (acc, _em) in zip(facts[i:i + step], res):
            scores[f.uuid] = acc
        if progress:
            progress(min(i + step, len(facts)), len(facts))
    return scores


def scores_key(model_cfg: ModelConfig, lama: LamaCKL, task: str) -> str:
    """The name of a score file, in the cache and among the shipped ones."""
    return f"{model_key(model_cfg)}-{lama.hash}-{task}"


def scores_cache_path(model_cfg: ModelConfig, lama: LamaCKL, task: str) -> Path:
    return cache_dir() / "tailor" / f"{scores_key(model_cfg, lama, task)}.json"


def logit_check(model, tokenizer, lama: LamaCKL, task: str, uuids: list[str], device="cpu") -> dict[str, float]:
    """Sums of the model's logits over the real positions of the probes of ``uuids`` (one batch): a fingerprint
    of the weights a shipped score file was computed with."""
    import torch

    by_uuid = {f.uuid: f for f in lama.all_facts()}
    probes = encode_probes(tokenizer, [by_uuid[u] for u in uuids], task)
    width = max(len(p.input_ids) for p in probes)
    ids = torch.full((len(probes), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(probes), width), dtype=torch.long)
    for b, p in enumerate(probes):
        ids[b, :len(p.input_ids)] = torch.tensor(p.input_ids)
        mask[b, :len(p.input_ids)] = 1
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.double().cpu()
    finally:
        model.train(was_training)
    real = logits[mask.bool()]
    return {"sum": real.sum().item(), "abs_sum": real.abs().sum().item()}


def shipped_scores_file(model_cfg: ModelConfig, lama: LamaCKL, task: str) -> Optional[Path]:
    """The shipped score file of this model, data and task, if there is one and it describes exactly them."""
    path = SHIPPED_SCORES / f"{scores_key(model_cfg, lama, task)}.json"
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        log.warning("shipped scores %s are not readable JSON: scoring the facts instead", path)
        return None
    want = {"format": SHIPPED_FORMAT, "model_key": model_key(model_cfg), "data_hash": lama.hash, "task": task}
    if not isinstance(rec, dict) or any(rec.get(k) != v for k, v in want.items()) or \
            not isinstance(rec.get("scores"), dict) or set(rec["scores"]) != {f.uuid for f in lama.all_facts()}:
        log.warning("shipped scores %s do not describe this model, data and task: scoring the facts instead", path)
        return None
    return path


def _shipped_if_model_agrees(model_cfg: ModelConfig, lama: LamaCKL, task: str, model_factory, tokenizer,
                             device) -> Optional[dict]:
    path = shipped_scores_file(model_cfg, lama, task)
    if path is None:
        return None
    rec = json.loads(path.read_text())
    check = rec.get("check") or {}
    try:
        got = logit_check(model_factory(), tokenizer, lama, task, list(check["uuids"]), device)
        agrees = all(math.isclose(got[k], float(check[k]), rel_tol=CHECK_RTOL) for k in ("sum", "abs_sum"))
    except (KeyError, TypeError, ValueError):
        agrees, got = False, None
    if not agrees:
        log.warning("the model does not compute the logits recorded in %s (%s, here %s): scoring the facts instead",
                    path, {k: check.get(k) for k in ("sum", "abs_sum")}, got)
        return None
    return rec


def cached_scores(model_cfg: ModelConfig, lama: LamaCKL, task: str, model_factory, tokenizer,
                  batch_size: int = 32, device="cpu", progress=None) -> dict[str, float]:
    """Base-model probe accuracy of every fact, from the cache, else from the shipped file of this model, data
    and task (when the model computes its recorded logits), else computed (``model_factory()``)."""
    path = scores_cache_path(model_cfg, lama, task)

    def cached():
        if path.is_file():
            try:
                return json.loads(path.read_text())["scores"]
            except (json.JSONDecodeError, KeyError):
                return None  # a broken cache entry is recomputed
        return None

    scores = cached()
    if scores is not None:
        return scores
    with exclusive(path):  # trials started together score the facts once; the others wait and read the cache
        scores = cached()
        if scores is None:
            shipped = _shipped_if_model_agrees(model_cfg, lama, task, model_factory, tokenizer, device)
            if shipped is not None:
                scores = shipped["scores"]
                origin = f"shipped: {SHIPPED_SCORES.name}/{path.name}"
            else:
                scores = score_facts(model_factory(), tokenizer, lama, task, batch_size, device, progress)
                origin = "computed"
            write_json_atomic(path, {"model": model_cfg.name, "data_hash": lama.hash, "task": task,
                                     "origin": origin, "scores": scores})
    return scores


def build_split(data_cfg: DataConfig, model_cfg: ModelConfig, lama: LamaCKL, tokenizer, model_factory,
                batch_size: int = 32, device="cpu", ta_pool_size: Optional[int] = None, progress=None) -> Split:
    if data_cfg.split == "file":
        if not data_cfg.split_file:
            from .errors import InputError

            raise InputError("data.split_file", "required when data.split is 'file'")
        split = load_split_file(lama, data_cfg.split_file)
        return split
    if data_cfg.split == "release":
        scores = release_scores(lama, data_cfg.task, data_cfg.release_model)
        origin = f"release:{data_cfg.release_model}"
    else:
        scores = cached_scores(model_cfg, lama, data_cfg.task, model_factory, tokenizer, batch_size, device,
                               progress)
        origin = f"tailored:{model_key(model_cfg)}"
    keep = None
    if data_cfg.max_doc_tokens:
        limit = data_cfg.max_doc_tokens
        keep = lambda f: doc_token_count(tokenizer, f.evidence) <= limit  # noqa: E731
    return make_split(lama, scores, data_cfg.task, origin, data_cfg.to_learn_size, data_cfg.ntf_size,
                      ta_pool_size, data_cfg.seed, keep)


def write_split(split: Split, out_dir: Path, lama: LamaCKL, task: str) -> None:
    out_dir = Path(out_dir)
    sets = {u: "to_learn" for u in (f.uuid for f in split.to_learn)}
    sets.update({f.uuid: "ntf" for f in split.ntf})
    sets.update({f.uuid: "ta_pool" for f in split.ta_pool})
    per_fact = [{"uuid": f.uuid, "source": f.source, "subject": f.subject, "relation": f.relation,
                 "object": f.object, "score": split.scores.get(f.uuid), "set": sets.get(f.uuid)}
                for f in lama.all_facts()]
    write_json_atomic(out_dir / "split.json", dict(split.to_json(), task=task, data_hash=lama.hash,
                                                   sizes=split.summary()))
    write_json_atomic(out_dir / "scores.json", per_fact)


# ------------------------------------------------------------------------------------------------------------
# The shipped score files: `python -m trainables.tailor ship --model smollm2-135m` writes one,
# `python -m trainables.tailor check` recomputes every shipped file and compares.


def _fresh_scores(model_name: str, task: str, batch_size: int, threads: Optional[int], facts: Optional[int] = None):
    """(model config, data, tokenizer, base model, scores computed now by :func:`score_facts`; ``facts``: of that
    many facts only, spread evenly over the sorted uuids)."""
    import torch

    from .data import load_lama
    from .theta import build_theta

    if threads:
        torch.set_num_threads(threads)
    model_cfg = ModelConfig(name=model_name)
    lama = load_lama()
    theta = build_theta(model_cfg, None, torch.device("cpu"))  # the base model, as `taalm data tailor` scores
    only = None
    if facts is not None:
        uuids = sorted(f.uuid for f in lama.all_facts())
        only = set(uuids[::max(1, len(uuids) // facts)][:facts])
    scores = score_facts(theta.model, theta.tokenizer, lama, task, batch_size, "cpu", only=only)
    return model_cfg, lama, theta, scores


def ship(model_name: str, task: str, batch_size: int = 32, threads: Optional[int] = None) -> Path:
    """Score every fact of the shipped LAMA-CKL with ``model_name`` and write the shipped score file."""
    import platform

    import torch
    import transformers

    model_cfg, lama, theta, scores = _fresh_scores(model_name, task, batch_size, threads)
    uuids = sorted(scores)[:CHECK_FACTS]
    path = SHIPPED_SCORES / f"{scores_key(model_cfg, lama, task)}.json"
    import subprocess

    sha = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip() or "unknown"
    write_json_atomic(path, {
        "format": SHIPPED_FORMAT, "model": model_name, "model_key": model_key(model_cfg), "data_hash": lama.hash,
        "task": task, "n_facts": len(scores),
        "produced_by": {"command": f"python -m trainables.tailor ship --model {model_name} --task {task}",
                        "function": "trainables.tailor.score_facts on the base model (build_theta, no adapter)",
                        "batch_size": batch_size, "device": "cpu", "torch_threads": torch.get_num_threads(),
                        "torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version(), "code_version": sha},
        "check": {"uuids": uuids, **logit_check(theta.model, theta.tokenizer, lama, task, uuids)},
        "scores": dict(sorted(scores.items()))})
    return path


def check(threads: Optional[int] = None, facts: Optional[int] = None) -> list[str]:
    """Recompute every shipped score file (``facts``: that many of its facts, spread over the sorted uuids, and the
    logit check); the differences found (empty: each equals a fresh computation)."""
    problems = []
    for path in sorted(SHIPPED_SCORES.glob("*.json")):
        rec = json.loads(path.read_text())
        model_cfg, lama, theta, scores = _fresh_scores(rec["model"], rec["task"], rec["produced_by"]["batch_size"],
                                                       threads, facts)
        if path.name != f"{scores_key(model_cfg, lama, rec['task'])}.json" or \
                shipped_scores_file(model_cfg, lama, rec["task"]) != path:
            problems.append(f"{path.name}: not the score file of {rec['model']} on this data ({lama.hash})")
            continue
        differ = sorted(u for u in scores if rec["scores"].get(u) != scores[u])
        if differ:
            problems.append(f"{path.name}: {len(differ)} of {len(scores)} facts score differently now, e.g. "
                            f"{differ[0]}: shipped {rec['scores'].get(differ[0])}, now {scores[differ[0]]}")
        got = logit_check(theta.model, theta.tokenizer, lama, rec["task"], rec["check"]["uuids"])
        if not all(math.isclose(got[k], rec["check"][k], rel_tol=CHECK_RTOL) for k in ("sum", "abs_sum")):
            problems.append(f"{path.name}: logit check {got} against the recorded {rec['check']}")
        print(f"{path.name}: {len(scores)} facts recomputed, {len(differ)} differ", flush=True)
    return problems


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m trainables.tailor", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("ship", help="score every fact with a model and write data/tailor_scores/<key>.json")
    s.add_argument("--model", default="smollm2-135m")
    s.add_argument("--task", default="descriptive", choices=["descriptive", "schematic"])
    s.add_argument("--threads", type=int, default=None)
    c = sub.add_parser("check", help="recompute every shipped score file and compare (exit 1 on a difference)")
    c.add_argument("--threads", type=int, default=None)
    c.add_argument("--facts", type=int, default=None, help="recompute this many facts only (spread over the uuids)")
    args = ap.parse_args(argv)
    if args.cmd == "ship":
        print(ship(args.model, args.task, threads=args.threads))
        return 0
    problems = check(args.threads, args.facts)
    for p in problems:
        print("DIFFERS:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
