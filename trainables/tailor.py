"""Tailoring LAMA-CKL to a base model (ALGORITHM.md §3): score every fact with the model's own probe
accuracy, then split. Scores are cached per (model, data hash, task) so they are computed once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .checkpoint import exclusive, write_json_atomic
from .config import DataConfig, ModelConfig
from .data import LamaCKL, Split, load_split_file, make_split, release_scores
from .encode import doc_token_count, encode_probes
from .metrics import probe_scores
from .models import cache_dir, model_key


def score_facts(model, tokenizer, lama: LamaCKL, task: str, batch_size: int = 32,
                device="cpu", progress=None) -> dict[str, float]:
    facts = lama.all_facts()
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


def cached_scores(model_cfg: ModelConfig, lama: LamaCKL, task: str, model_factory, tokenizer,
                  batch_size: int = 32, device="cpu", progress=None) -> dict[str, float]:
    """Base-model probe accuracy of every fact, from the cache or computed (``model_factory()``)."""
    key = f"{model_key(model_cfg)}-{lama.hash}-{task}"
    path = cache_dir() / "tailor" / f"{key}.json"

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
            scores = score_facts(model_factory(), tokenizer, lama, task, batch_size, device, progress)
            write_json_atomic(path, {"model": model_cfg.name, "data_hash": lama.hash, "task": task,
                                     "scores": scores})
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
