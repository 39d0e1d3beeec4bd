"""Meta-training Train-Attention φ (ALGORITHM.md §4), in the shape every loop shares (trainables/loop.py).

    setup = prepare_meta(cfg)                       # θ_0, φ, the Train-Attention pool: built once
    metrics = meta_train(cfg, out_dir, callbacks, resume=True, setup=setup)

The loop draws meta-batches pass by pass over the pool (:class:`MetaOrder`), takes the meta-gradient
(trainables/bilevel.py) and an AdamW step on φ, and every ``val_every`` steps checks φ (trainables/phi_checks.py:
validation accuracy on held-out facts, where φ puts its weight), keeps the best φ in OUT/phi, writes a checkpoint
(OUT/checkpoint: φ, its optimizer, the data-order position and RNG states, the history, the best φ; safetensors +
JSON) and reports (kind "check"). With ``resume`` it continues after the last check, exactly as an uninterrupted
run; ``meta.steps`` / ``meta.epochs`` may grow on resume (train φ longer). :func:`finish_meta` then writes
OUT/meta_metrics.json and OUT/heatmap.html with the best φ and measures its focus on the TO-LEARN evidence.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from . import seeds
from .bilevel import Inner, MetaExample, make_example, meta_gradient
from .checkpoint import load_extra, load_loop_checkpoint, save_loop_checkpoint, write_json_atomic
from .config import DataConfig, ModelConfig, ParamsConfig, _Strict, config_to_dict
from .data import Fact, Split, load_lama
from .encode import encode_documents
from .errors import InputError
from .loop import Callback, Report, check_resumable
from .phi_checks import heatmap_html, validate_phi, weight_focus
from .registry import INNER_OPTIMIZERS
from .tailor import build_split
from .theta import Theta, build_theta, resolve_device
from .train_attention import PhiConfig, TrainAttention, build_phi, phi_trainable, save_phi


class MetaOptions(_Strict):
    steps: int = Field(100, ge=0)
    # passes over the Train-Attention pool (as the release trains); when set, it decides the number of
    # steps: epochs × ceil(n_train / batch_size). Either way examples are drawn epoch by epoch, each
    # example once per pass, in a seeded order.
    epochs: Optional[int] = Field(None, ge=1)
    batch_size: int = Field(16, ge=1)  # meta-batch: examples whose φ-gradients are averaged
    lr: float = Field(2e-4, gt=0)  # AdamW on φ
    weight_decay: float = Field(0.0, ge=0)
    inner_optimizer: str = "adamw"  # a name of trainables.registry.INNER_OPTIMIZERS: sgd, adam, adamw
    inner_lr: float = Field(2e-4, gt=0)
    dummy_loop: int = Field(1, ge=0)
    inner_steps: int = Field(1, ge=1)
    objective: Literal["phi_loss", "change3", "change2"] = "phi_loss"
    restrict_unrelated: float = Field(0.0, ge=0)  # λ of |l(θ') - l(θ_0)| on an unrelated probe
    max_length: int = Field(512, ge=8)
    val_every: int = Field(10, ge=1)
    val_size: int = Field(16, ge=1)
    val_dummy_loop: int = Field(3, ge=0)  # validation trains val_dummy_loop + 1 epochs
    val_batch_size: int = Field(8, ge=1)
    pool_size: Optional[int] = Field(None, ge=2)  # subsample the Train-Attention pool
    # "vmap": the meta-batch's inner loops run together (torch.func.vmap over per-example θ, documents
    # padded to the batch's longest), the same mathematics as "sequential" (one example after another);
    # falls back to sequential, with a logged reason, where it cannot batch
    batching: Literal["vmap", "sequential"] = "vmap"
    # vmap: examples per vmapped group; the groups' φ-gradients are summed into the meta-batch's mean (the
    # same mathematics; the second-order graph alive at once, hence the peak memory, scales with the group)
    vmap_chunk: Optional[int] = Field(None, ge=1)
    # the forward passes of θ and φ inside the meta-step and its validation's training: fp32, or bf16 autocast (the
    # first- and second-order gradients flow through autocast's casts; parameters and optimizers stay fp32); the
    # validation's probe accuracy is judged in fp32 either way
    precision: Literal["fp32", "bf16"] = "fp32"

    @field_validator("inner_optimizer")
    @classmethod
    def _known_optimizer(cls, v: str) -> str:
        return INNER_OPTIMIZERS.check(v)


class MetaConfig(_Strict):
    seed: int = 0
    device: str = "auto"
    model: ModelConfig = ModelConfig()
    params: ParamsConfig = ParamsConfig(kind="lora", r=8, alpha=16, dropout=0.0)
    phi: PhiConfig = PhiConfig()
    data: DataConfig = DataConfig()
    meta: MetaOptions = MetaOptions()
    task: Literal["descriptive", "schematic"] = "descriptive"
    # meta-examples from a JSON-lines file of {text, subject, relation, object} (e.g. TemporalWiki) instead of
    # the tailored LAMA-CKL Train-Attention pool; the probe is the schematic "Guess the object" sentence
    records: Optional[str] = None

    @field_validator("model")
    @classmethod
    def _second_order_needs_eager(cls, v: ModelConfig) -> ModelConfig:
        if v.attention != "eager":
            from .config import ConfigKeyError

            raise ConfigKeyError(("attention",), "meta-training differentiates through θ's update (second order): "
                                                 "model.attention must be eager (PyTorch's fused attention kernels "
                                                 "have no double backward)")
        return v


# how long φ trains and how it is computed may change on resume; what it learns may not
RESUME_IGNORED = ("meta.steps", "meta.epochs", "device", "meta.batching", "meta.vmap_chunk")


class MetaRecord(BaseModel):
    model_config = ConfigDict(extra="allow")
    text: str
    subject: str
    relation: str
    object: str


def record_facts(path: str) -> list[Fact]:
    from .data import read_jsonl_validated
    from .temporalwiki import probe_sentence

    facts = []
    for line, r in read_jsonl_validated(Path(path), MetaRecord):
        if r.object not in r.text:
            raise InputError(f"{path}:{line}", f"field 'object': {r.object!r} does not occur in the text")
        probe = probe_sentence(r.subject, r.relation, r.object)
        facts.append(Fact(f"record-{line}", r.subject, r.relation, r.object, r.text, probe, probe,
                          Path(path).stem, line))
    return facts


# ---- the setup, built once ---------------------------------------------------------------------------------


@dataclass
class MetaSetup:
    """Everything meta-training needs (:func:`prepare_meta`): θ (its trainable values at start are θ_0, every
    meta-example's starting point), φ, the inner loop, the held-out and training examples."""

    cfg: MetaConfig
    theta: Theta
    phi: TrainAttention
    inner: Inner
    train: list[MetaExample]
    val: list[MetaExample]
    split: Optional[Split]  # LAMA-CKL (None for records)
    data_hash: str

    tokenizer = property(lambda self: self.theta.tokenizer)
    device = property(lambda self: self.theta.device)

    @property
    def fixed(self) -> list[MetaExample]:
        """A fixed set: the meta-objective before and after training."""
        return self.train[:min(8, len(self.train))]


def _setup_pool(cfg: MetaConfig, theta: Theta, progress=None) -> tuple[list[Fact], Optional[Split], str]:
    """The Train-Attention pool (the tailored LAMA-CKL pool, or ``records``), its split and data hash."""
    if cfg.records:
        from .data import data_hash

        pool = record_facts(cfg.records)
        if cfg.meta.pool_size:
            if cfg.meta.pool_size > len(pool):
                raise InputError("meta.pool_size", f"requested {cfg.meta.pool_size} facts, but {cfg.records} "
                                                   f"holds {len(pool)} records")
            pool = random.Random(seeds.meta_pool(cfg.seed)).sample(pool, cfg.meta.pool_size)
        return pool, None, data_hash([Path(cfg.records)])
    lama = load_lama(cfg.data.dir)
    data_cfg = cfg.data.model_copy(update={"task": cfg.task})
    split = build_split(data_cfg, cfg.model, lama, theta.tokenizer, lambda: theta.model, 32, theta.device,
                        ta_pool_size=cfg.meta.pool_size, progress=progress)
    return list(split.ta_pool), split, lama.hash


def _setup_examples(cfg: MetaConfig, tokenizer, pool: list[Fact], device) -> tuple[list, list]:
    """(held-out, training) meta-examples: a seeded shuffle of the pool, the first ``val_size`` held out."""
    if len(pool) < cfg.meta.val_size + 1:
        raise InputError("meta.val_size", f"the Train-Attention pool has {len(pool)} facts; "
                                          f"need more than val_size={cfg.meta.val_size}")
    random.Random(seeds.meta_pool(cfg.seed)).shuffle(pool)
    task = "schematic" if cfg.records else cfg.task
    mk = lambda f: make_example(tokenizer, f, task, cfg.meta.max_length, device)  # noqa: E731
    return [mk(f) for f in pool[:cfg.meta.val_size]], [mk(f) for f in pool[cfg.meta.val_size:]]


def _setup_inner(cfg: MetaConfig, theta: Theta) -> Inner:
    """θ as a function of parameter dicts: θ_0 = its trainable values now; no dropout inside the meta-objective
    (its gradient is deterministic); the module's own parameters frozen (functional_call supplies them)."""
    theta.model.eval()
    theta0 = {k: v.detach().clone() for k, v in theta.trainable.items()}
    for p in theta.model.parameters():
        p.requires_grad_(False)
    return Inner(theta.model, theta0, cfg.meta, theta.pad_id)


def prepare_meta(cfg: MetaConfig, progress=None) -> MetaSetup:
    device = resolve_device(cfg.device)
    seeds.seed_everything(cfg.seed)
    theta = build_theta(cfg.model, cfg.params, device, cfg.seed)
    pool, split, data_hash = _setup_pool(cfg, theta, progress)
    val, train = _setup_examples(cfg, theta.tokenizer, pool, device)
    inner = _setup_inner(cfg, theta)
    phi = build_phi(cfg.phi, cfg.model, theta.tokenizer, seed=seeds.phi_init(cfg.seed)).to(device)
    phi.train()
    return MetaSetup(cfg, theta, phi, inner, train, val, split, data_hash)


# ---- the loop's state ----------------------------------------------------------------------------------------


def meta_steps(opts: MetaOptions, n_train: int) -> int:
    """The number of meta-steps: ``epochs`` passes over the pool when given, else ``steps``."""
    return opts.epochs * -(-n_train // opts.batch_size) if opts.epochs else opts.steps


class MetaOrder:
    """The meta-batches: every pass over the pool is a fresh permutation, cut into batches (the last of a pass
    may be smaller), drawn from one seeded stream that also draws the unrelated probes. Its state (the stream,
    the pass's permutation, the position in it) is part of a checkpoint."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size = n, batch_size
        self.rng = random.Random(seeds.meta_pool(seed))
        self.perm: Optional[list[int]] = None
        self.pos = 0

    def next_batch(self) -> list[int]:
        if self.perm is None or self.pos >= self.n:
            self.perm = list(range(self.n))
            self.rng.shuffle(self.perm)
            self.pos = 0
        batch = self.perm[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return batch

    def state_dict(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss], "perm": self.perm, "pos": self.pos}

    def load_state_dict(self, d: dict) -> None:
        version, internal, gauss = d["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.perm, self.pos = d["perm"], d["pos"]


@dataclass
class MetaState:
    """What the loop has done so far (all of it goes into a checkpoint)."""

    step: int = 0  # the last meta-step taken
    history: dict = field(default_factory=lambda: {"step": [], "objective": [], "seconds": []})
    checks: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"val_acc": -1.0, "step": None})
    best_tensors: Optional[dict] = None  # φ's trainable tensors at the best check
    objective_before: Optional[float] = None
    wall_before: float = 0.0


def _save(ckpt: Path, s: MetaSetup, opt, order: MetaOrder, st: MetaState, wall: float, cfg_dict: dict) -> None:
    save_loop_checkpoint(ckpt, phi_trainable(s.phi), opt, {
        "step": st.step, "history": st.history, "checks": st.checks, "best": st.best,
        "objective_before": st.objective_before, "order": order.state_dict(), "wall_seconds": wall,
        "config": cfg_dict}, extra=st.best_tensors)


def _restore(ckpt: Path, s: MetaSetup, opt, order: MetaOrder, cfg_dict: dict) -> MetaState:
    state = load_loop_checkpoint(ckpt, phi_trainable(s.phi), opt)
    check_resumable(state.get("config", {}), cfg_dict, RESUME_IGNORED, str(ckpt))
    order.load_state_dict(state["order"])
    return MetaState(state["step"], state["history"], state["checks"], state["best"], load_extra(ckpt),
                     state["objective_before"], state["wall_seconds"])


def _write_best(out: Path, s: MetaSetup, st: MetaState) -> None:
    check = next(c for c in st.checks if c["step"] == st.best["step"])
    save_phi(out / "phi", None, s.cfg.phi, s.cfg.model, s.tokenizer, {
        "data_hash": s.data_hash, "meta_config": config_to_dict(s.cfg), "step": st.best["step"], "validation": check},
        tensors=st.best_tensors)


# ---- the loop ------------------------------------------------------------------------------------------------


def meta_train(cfg: MetaConfig, out_dir: Optional[str | Path] = None, callbacks: Sequence[Callback] = (),
               resume: bool = True, setup: Optional[MetaSetup] = None) -> dict:
    """Train φ (or continue from OUT/checkpoint); write OUT/phi/ (best φ by validation accuracy),
    OUT/meta_metrics.json, OUT/heatmap.html. Returns the metrics."""
    t_start = time.perf_counter()
    out = Path(out_dir) if out_dir else None
    ckpt = out / "checkpoint" if out else None
    s = setup or prepare_meta(cfg)
    opt = torch.optim.AdamW(list(phi_trainable(s.phi).values()), lr=cfg.meta.lr, weight_decay=cfg.meta.weight_decay)
    order = MetaOrder(len(s.train), cfg.meta.batch_size, cfg.seed)
    cfg_dict = config_to_dict(cfg)
    n_steps = meta_steps(cfg.meta, len(s.train))
    resumed = bool(resume and ckpt is not None and ckpt.exists())
    if resumed:
        st = _restore(ckpt, s, opt, order, cfg_dict)
        if st.best["step"] is not None:
            _write_best(out, s, st)  # OUT/phi as of the checkpoint (the directory may be new: another machine)
    else:
        st = MetaState(objective_before=meta_gradient(s.inner, s.phi, s.fixed)[0])
    info = {"n_train_examples": len(s.train), "n_val_examples": len(s.val), "n_steps": n_steps,
            "data_hash": s.data_hash, "resumed_from": st.step if resumed else None,
            "restored": [dict(c, index=c["step"]) for c in st.checks]}
    for cb in callbacks:
        cb.on_start(info)

    def check(step: int) -> None:
        s.phi.eval()
        v = validate_phi(s.inner, s.phi, s.val, s.tokenizer, s.device)
        s.phi.train()
        v["step"] = step
        st.checks.append(v)
        if v["val_acc"] > st.best["val_acc"]:
            st.best.update(val_acc=v["val_acc"], step=step, object_weight_ratio=v["object_weight_ratio"])
            st.best_tensors = {k: p.detach().cpu().clone() for k, p in phi_trainable(s.phi).items()}
            if out is not None:
                _write_best(out, s, st)
        wall = st.wall_before + time.perf_counter() - t_start
        if ckpt is not None:
            _save(ckpt, s, opt, order, st, wall, cfg_dict)
        report = Report("check", step, n_steps, {k: v[k] for k in v if k != "step"},
                        {"best_val_acc": st.best["val_acc"], "best_step": st.best["step"]}, wall,
                        str(ckpt) if ckpt is not None else None)
        for cb in callbacks:
            cb.on_report(report)

    if not resumed:
        check(0)
    for step in range(st.step + 1, n_steps + 1):
        ts = time.perf_counter()
        batch = [s.train[i] for i in order.next_batch()]
        unrelated = [order.rng.choice(s.train) for _ in batch] if cfg.meta.restrict_unrelated else []
        obj, grads = meta_gradient(s.inner, s.phi, batch, unrelated)
        for k, p in phi_trainable(s.phi).items():
            p.grad = grads[k]
        opt.step()
        opt.zero_grad(set_to_none=True)
        st.step = step
        for key, value in (("step", step), ("objective", obj), ("seconds", time.perf_counter() - ts)):
            st.history[key].append(value)
        for cb in callbacks:
            cb.on_step(0, step - 1, n_steps, obj)
        if step % cfg.meta.val_every == 0 or step == n_steps:
            check(step)
    return finish_meta(s, st, out, n_steps, st.wall_before + time.perf_counter() - t_start)


def finish_meta(s: MetaSetup, st: MetaState, out: Optional[Path], n_steps: int, wall: float) -> dict:
    """The results of meta-training: the metrics (objective on the fixed set before and after, every check,
    the best step), then, with the best φ, its focus on the TO-LEARN evidence (facts outside φ's pool) and the
    heatmap; OUT/meta_metrics.json and OUT/heatmap.html."""
    cfg = s.cfg
    metrics = {"objective": st.history["objective"], "step_seconds": st.history["seconds"], "validation": st.checks,
               "objective_fixed_set": {"before": st.objective_before,
                                       "after": meta_gradient(s.inner, s.phi, s.fixed)[0],
                                       "n_examples": len(s.fixed)},
               "best_step": st.best["step"], "best_val_acc": st.best["val_acc"], "wall_seconds": wall,
               "n_train_examples": len(s.train), "n_val_examples": len(s.val), "n_steps": n_steps,
               "data_hash": s.data_hash, "config": config_to_dict(cfg)}
    with torch.no_grad():  # the best φ from here on
        for k, p in phi_trainable(s.phi).items():
            p.copy_(st.best_tensors[k])
    s.phi.eval()
    if s.split is not None and s.split.to_learn:
        docs = encode_documents(s.tokenizer, s.split.to_learn, cfg.meta.max_length)
        metrics["held_out_focus"] = {"documents": "TO-LEARN evidence (outside the Train-Attention pool)",
                                     "phi_step": st.best["step"],
                                     **weight_focus(s.phi, docs, s.tokenizer.pad_token_id, s.device)}
    if out is not None:
        write_json_atomic(out / "meta_metrics.json", metrics)
        (out / "heatmap.html").write_text(heatmap_html(s.phi, s.tokenizer, s.val,
                                                       f"Train-Attention weights (best step {st.best['step']})"))
    return metrics
