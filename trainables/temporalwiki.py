"""The TemporalWiki protocol (ALGORITHM.md §6): θ carries over from period to period; in each period
it trains (1 epoch by default) on that period's Wikipedia diff documents, then is evaluated by
perplexity on the period's CHANGED and UNCHANGED probes.

Probe sentence: "Guess the object. \\n  subject is S , relation is R , object is O"; perplexity over the
object tokens (last occurrence of O, located by character offsets):
    ppl = exp( Σ_probes Σ_object tokens NLL / Σ_probes #object tokens ).

Diff sets are not shipped: each period's ``diff`` is a file in TWiki-Diffsets' published format (CSV, a ``text``
column), JSON lines or Parquet (column ``temporalwiki.text_column``), streamed through `datasets`, filtered, sampled
(``max_docs_per_period``) and tokenized once into a memory-mapped Arrow cache under TAALM_CACHE, read a batch at a
time (trainables/twdata.py). Probes (the same formats) default to the shipped files
(data/temporalwiki_probes/<from>-<to>_{changed,unchanged}.jsonl; fields subject, relation, object).
A run checkpoints after every period and, with ``checkpoint_every_steps``, inside a period (its position in the
period's data order), and resumes there with the numbers of an uninterrupted run.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import seeds
from .checkpoint import write_json_atomic
from .config import RunConfig, _Strict, config_to_dict
from . import twdata, twread
from .data import REPO_ROOT
from .errors import InputError
from .loss import token_nll
from .metrics import EncodedProbe, encode_probe, mean

if TYPE_CHECKING:
    from .continual import RunSetup

PROBE_DIR = REPO_ROOT / "data" / "temporalwiki_probes"
# the shipped probe files, by period name
DEFAULT_PROBES = {"0910": "0901-1001", "1011": "1001-1101", "1112": "1101-1201"}


def probe_sentence(subject: str, relation: str, obj: str) -> str:
    return f"Guess the object. \n  subject is {subject} , relation is {relation} , object is {obj}"


class ProbeRecord(BaseModel):
    model_config = ConfigDict(extra="allow")
    subject: str
    relation: str
    object: str

    @field_validator("object")
    @classmethod
    def _non_empty(cls, v):
        if not v.strip():
            raise ValueError("must not be empty")
        return v


class Period(_Strict):
    name: str
    diff: str  # the period's diff set: .csv (TWiki-Diffsets' format), .jsonl or .parquet
    changed: Optional[str] = None  # default: the shipped probes of this period
    unchanged: Optional[str] = None


class TemporalWikiOptions(_Strict):
    periods: list[Period] = Field(..., min_length=1)
    epochs_per_period: int = Field(1, ge=1)
    probe_size: Optional[int] = Field(None, ge=1)  # seeded subsample of each probe set
    max_docs_per_period: Optional[int] = Field(None, ge=1)  # seeded sample of each period's documents
    diff_size: Optional[int] = Field(None, ge=1)  # its former name, kept equal to it (MLflow's trial params read it)
    text_column: str = Field("text", min_length=1)
    long_docs: Literal["truncate", "chunk"] = "truncate"  # beyond train.max_length: truncate (the TAALM release)
    filter: Literal["none", "taalm"] = "none"  # taalm: the release's filter of diff-set rows (twdata.keep_mask)
    checkpoint_every_steps: Optional[int] = Field(None, ge=1)  # checkpoints inside a period too
    eval_batch_size: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _one_name(self):
        if None not in (self.diff_size, self.max_docs_per_period) and self.diff_size != self.max_docs_per_period:
            raise ValueError("give max_docs_per_period (diff_size is its former name), not both")
        k = self.max_docs_per_period if self.max_docs_per_period is not None else self.diff_size
        self.__dict__.update(max_docs_per_period=k, diff_size=k)
        return self


class TemporalWikiConfig(RunConfig):
    temporalwiki: TemporalWikiOptions


def resolve_paths(cfg: "TemporalWikiConfig", base_dir: Path) -> "TemporalWikiConfig":
    """Relative diff/probe/replay-pool paths are relative to the config file's directory."""
    periods = []
    for p in cfg.temporalwiki.periods:
        upd = {k: str((base_dir / v).resolve()) for k in ("diff", "changed", "unchanged")
               if (v := getattr(p, k)) and not Path(v).is_absolute()}
        periods.append(p.model_copy(update=upd))
    update = {"temporalwiki": cfg.temporalwiki.model_copy(update={"periods": periods})}
    pool = cfg.replay.pool
    if pool not in ("disjoint", "ntf") and not Path(pool).is_absolute():
        update["replay"] = cfg.replay.model_copy(update={"pool": str((base_dir / pool).resolve())})
    return cfg.model_copy(update=update)


def _probe_path(period: Period, kind: str) -> Path:
    given = getattr(period, kind)
    if given:
        return Path(given)
    stem = DEFAULT_PROBES.get(period.name)
    if stem is None:
        raise InputError(f"temporalwiki.periods ({period.name})",
                         f"no shipped {kind} probes for period {period.name!r} (shipped: "
                         f"{', '.join(DEFAULT_PROBES)}); give `{kind}:` a file")
    return PROBE_DIR / f"{stem}_{kind}.jsonl"


def load_probes(path: Path, tokenizer, size: Optional[int], seed: int, where: str) -> list[EncodedProbe]:
    """A probe file (JSON lines, CSV or Parquet with subject, relation, object) through `datasets`, every row
    validated (``file:line`` of the first bad one)."""
    rows = []
    for i, raw in enumerate(twread.read_rows(path, ("subject", "relation", "object"), where)):
        try:
            rows.append(ProbeRecord.model_validate(raw))
        except ValidationError as e:
            err = e.errors()[0]
            raise InputError(twread.row_location(path, i), f"field {'.'.join(map(str, err['loc']))!r}: "
                                                           f"{err['msg']}") from None
    if size is not None and size < len(rows):
        rows = random.Random(seed).sample(rows, size)
    return [encode_probe(tokenizer, probe_sentence(r.subject, r.relation, r.object), r.object, where=str(path))
            for r in rows]


def load_diff(cfg: "TemporalWikiConfig", i: int, tokenizer) -> twdata.DiffSet:
    """Period ``i``'s diff set, tokenized (from the cache, or into it): its seeded sample of
    ``max_docs_per_period`` documents, or all of them."""
    tw = cfg.temporalwiki
    k = tw.max_docs_per_period
    return twdata.prepare_diff(Path(tw.periods[i].diff), tokenizer, text_column=tw.text_column,
                               max_length=cfg.train.max_length, long_docs=tw.long_docs, filter=tw.filter,
                               sample=(seeds.temporalwiki_subsample(cfg.seed, i, "diff"), k) if k else None,
                               where=f"temporalwiki.periods[{i}].diff")


@torch.no_grad()
def object_perplexity(model, probes: Sequence[EncodedProbe], pad_id: int, batch_size: int = 32,
                      device="cpu") -> float:
    """exp(mean NLL over all object tokens of all probes)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(probes), batch_size):
            chunk = probes[i:i + batch_size]
            width = max(len(p.input_ids) for p in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for b, p in enumerate(chunk):
                ids[b, :len(p.input_ids)] = torch.tensor(p.input_ids)
                mask[b, :len(p.input_ids)] = 1
            nll = token_nll(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits, ids.to(device),
                            mask.to(device)).cpu()
            for b, p in enumerate(chunk):
                pos = torch.tensor(p.positions) - 1  # nll[t] is the loss of predicting token t+1
                total += float(nll[b, pos].sum())
                count += len(p.positions)
    finally:
        model.train(was)
    return math.exp(total / count)


@dataclass
class TemporalWikiSetup:
    """Everything a TemporalWiki run needs, built once (:func:`prepare_temporalwiki`): θ with its components
    (``run``; its ``docs`` are the current period's) and every period's documents and probes, read and
    validated before training."""

    run: "RunSetup"
    periods: list[dict]  # name, docs (a twdata.DiffSet), changed, unchanged


def prepare_temporalwiki(cfg: TemporalWikiConfig) -> TemporalWikiSetup:
    from .continual import RunSetup, build_components, finish_setup
    from .models import load_tokenizer
    from .theta import build_theta, resolve_device
    from .weighting import SchemeEnv

    tw = cfg.temporalwiki
    device = resolve_device(cfg.device)
    seeds.seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    periods = []
    for i, p in enumerate(tw.periods):  # read and validate every file before training
        periods.append({"name": p.name, "docs": load_diff(cfg, i, tokenizer), **{
            kind: load_probes(_probe_path(p, kind), tokenizer, tw.probe_size,
                              seeds.temporalwiki_subsample(cfg.seed, i, kind), f"temporalwiki.periods[{i}].{kind}")
            for kind in ("changed", "unchanged")}})
    env = SchemeEnv(tokenizer=tokenizer, device=device, dtype=cfg.model.dtype)
    weighting, regularizer, replay = build_components(cfg, env)
    if weighting.needs_reference_model:
        raise InputError("weighting.scheme", "schemes needing the frozen initial θ (rho1 with reference: initial) "
                                             "are not wired for TemporalWiki yet; give weighting.rho1.reference "
                                             "a model directory")
    if replay.needs_reference_model:
        raise InputError("replay.kind", "GeRe and SEEKR are not wired for TemporalWiki yet; use mix_review")
    theta = build_theta(cfg.model, cfg.params, device, cfg.seed, tokenizer=tokenizer)
    theta.model.train()
    run = finish_setup(RunSetup(cfg=cfg, theta=theta, docs=[], weighting=weighting, regularizer=regularizer,
                                replay=replay), env)
    return TemporalWikiSetup(run, periods)


RESUME_IGNORED = ("checkpoint.every", "temporalwiki.checkpoint_every_steps")


def temporalwiki_run(cfg: TemporalWikiConfig, out_dir: Optional[str | Path] = None, callbacks: Sequence = (),
                     resume: bool = True, setup: Optional[TemporalWikiSetup] = None) -> dict:
    """Train through the periods in order (θ carries over); evaluate after each, checkpoint (OUT/checkpoint)
    and report (kind "period"); with ``checkpoint_every_steps`` checkpoint inside a period too. Resumes where the
    last checkpoint was written (after a period, or at its step). Writes OUT/metrics.json."""
    from .checkpoint import load_loop_checkpoint, save_loop_checkpoint
    from .continual import DataParallel
    from .step import MicroBatching, autocast, train_step
    from .loop import Report, check_resumable

    t_start = time.perf_counter()
    tw = cfg.temporalwiki
    dp = DataParallel.from_torch()
    writer = dp is None or dp.rank == 0
    ckpt_dir = Path(out_dir) / "checkpoint" if out_dir is not None else None
    setup = setup or prepare_temporalwiki(cfg)
    run, model, pad = setup.run, setup.run.model, setup.run.pad_id
    optimizer = run.regularizer.optimizer(list(run.trainable.values()))
    micro = MicroBatching(cfg.train.oom, cfg.train.batch_size, cfg.train.micro_batch_size)
    cfg_dict = config_to_dict(cfg)
    results: list[dict] = []
    wall_before = 0.0
    at = None  # where a mid-period checkpoint stopped: period, epoch, next step, the period's losses so far
    if resume and ckpt_dir is not None and ckpt_dir.exists():
        state = load_loop_checkpoint(ckpt_dir, run.trainable, optimizer)
        check_resumable(state.get("config", {}), cfg_dict, RESUME_IGNORED, str(ckpt_dir))
        results, wall_before, at = state["results"], state["wall_seconds"], state.get("position")
    start = len(results)
    info = {"periods": [p["name"] for p in setup.periods], "resumed_from": start - 1 if start else None,
            "restored": [dict(r) for r in results]}
    for cb in callbacks:
        cb.on_start(info)

    def checkpoint(position: Optional[dict]) -> Optional[str]:
        if not (writer and ckpt_dir is not None and cfg.checkpoint.every):
            return None
        save_loop_checkpoint(ckpt_dir, run.trainable, optimizer, {
            "period": len(results) - 1, "position": position, "results": results,
            "wall_seconds": wall_before + time.perf_counter() - t_start, "config": cfg_dict})
        return str(ckpt_dir)

    for i in range(start, len(setup.periods)):
        period = setup.periods[i]
        docs_of = period["docs"]
        run.docs = docs_of
        loss_sum, n_steps = (at["loss_sum"], at["n_steps"]) if at else (0.0, 0)
        for e in range(at["epoch"] if at else 0, tw.epochs_per_period):
            order, n_batches = period_order(len(docs_of), cfg.train.batch_size,
                                            seeds.period_batch_order(cfg.seed, i, e))
            for step in range(at["step"] if at and at["epoch"] == e else 0, n_batches):
                idx = order[step * cfg.train.batch_size:(step + 1) * cfg.train.batch_size].tolist()
                gen = torch.Generator().manual_seed(seeds.period_step(cfg.seed, i, e, step))
                docs = docs_of.take(idx)
                loss, _, _ = micro.run(lambda size: train_step(run, optimizer, docs, gen, dp,
                                                               replay_round=seeds.period_round(i, e), step=step,
                                                               micro_batch_size=size),
                                       docs, f"period {period['name']}, epoch {e}, step {step}")
                loss_sum, n_steps = loss_sum + loss, n_steps + 1
                if tw.checkpoint_every_steps and (step + 1) % tw.checkpoint_every_steps == 0 \
                        and step + 1 < n_batches:
                    checkpoint({"epoch": e, "step": step + 1, "loss_sum": loss_sum, "n_steps": n_steps})
                for cb in callbacks:
                    cb.on_step(i, step, n_batches, loss)
        at = None
        with autocast(run.device, cfg.train.precision):
            ppl = {k: object_perplexity(model, period[k], pad, tw.eval_batch_size, run.device)
                   for k in ("changed", "unchanged")}
        res = {"period": period["name"], "index": i, "train_loss": loss_sum / n_steps if n_steps else float("nan"),
               "changed_ppl": ppl["changed"], "unchanged_ppl": ppl["unchanged"],
               "n_docs": len(docs_of), "n_changed": len(period["changed"]),
               "n_unchanged": len(period["unchanged"]), "max_docs_per_period": tw.max_docs_per_period,
               "data": docs_of.stats()}
        results.append(res)
        written = checkpoint(None)
        wall = wall_before + time.perf_counter() - t_start
        report = Report("period", i, len(setup.periods) - 1,
                        {k: res[k] for k in ("changed_ppl", "unchanged_ppl", "train_loss", "n_docs", "n_changed",
                                             "n_unchanged")}, _averages(results), wall, written, label=res["period"])
        for cb in callbacks:
            cb.on_report(report)
    metrics = {"periods": results, **_averages(results),
               "wall_seconds": wall_before + time.perf_counter() - t_start, "config": cfg_dict}
    if out_dir is not None and writer:
        write_json_atomic(Path(out_dir) / "metrics.json", metrics)
    return metrics


def period_order(n: int, batch_size: int, order_seed: int) -> tuple[torch.Tensor, int]:
    """A period's epoch: the seeded permutation of its ``n`` documents (``step.epoch_batches``' draw, kept as one
    tensor rather than n Python ints) and the number of batches it is cut into."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(order_seed))
    return perm, (n + batch_size - 1) // batch_size


def _averages(results: list[dict]) -> dict:
    return {"avg_changed_ppl": mean([r["changed_ppl"] for r in results]),
            "avg_unchanged_ppl": mean([r["unchanged_ppl"] for r in results])}
