"""The run configuration: one pydantic schema, validated before anything starts.

YAML files are loaded with :func:`load_config`, which keeps the line of every key so that a
validation error names ``file:line (key.path)``. ``--set dotted.key=value`` overrides are applied
before validation (trainables/configio.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# the file side (YAML with lines, overrides, validation with locations), re-exported: importers use trainables.config
from .configio import (ConfigKeyError, apply_overrides, config_to_dict, flatten, load_yaml,  # noqa: F401
                       validate)
from .registry import PARAMETERISATIONS, REGULARIZERS, REPLAYS, SCHEMES


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TinyModelConfig(_Strict):
    hidden_size: int = Field(64, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(128, ge=8)


class ModelConfig(_Strict):
    # "tiny" | "smollm2-135m" | "hf:<hub id or local path>" | a local directory
    name: str = "tiny"
    dtype: Literal["float32", "bfloat16", "float64"] = "float32"
    init_seed: int = 0  # seeds the random initialisation of `tiny`
    allow_download: bool = False  # let transformers fetch a hub id (off: local files only)
    tiny: TinyModelConfig = TinyModelConfig()
    # eager (the default: every result so far, and second-order gradients on CPU need it) or sdpa (PyTorch's fused
    # scaled-dot-product attention: faster, first-order only; not for meta-training's θ nor SEEKR's attention maps)
    attention: Literal["eager", "sdpa"] = "eager"


class KAdapterOptions(_Strict):
    layers: list[int] = []  # decoder layers to adapt; default: first, middle and last
    bottleneck: int = Field(64, ge=1)


class ParamsConfig(_Strict):
    """Which parameters of θ train (the parameterisation axis)."""

    kind: str = "lora"  # a name of trainables.registry.PARAMETERISATIONS: lora, qlora, full, kadapter
    r: int = Field(64, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    target_modules: Union[str, list[str]] = "all-linear"
    kadapter: KAdapterOptions = KAdapterOptions()

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, v: str) -> str:
        return PARAMETERISATIONS.check(v)


class DataConfig(_Strict):
    dir: Optional[str] = None  # default: the shipped data/lama_ckl
    task: Literal["descriptive", "schematic"] = "descriptive"
    # tailored: score every fact with the base model (cached); release: the `scores` field of the
    # release (`release_model`); file: a split.json written by `taalm data tailor`
    split: Literal["tailored", "release", "file"] = "tailored"
    split_file: Optional[str] = None
    release_model: str = "llama_7b"
    to_learn_size: Optional[int] = Field(None, ge=1)
    ntf_size: Optional[int] = Field(None, ge=1)
    # drop facts whose evidence is longer than this many tokens before subsampling (CPU-sized runs)
    max_doc_tokens: Optional[int] = Field(None, ge=4)
    seed: int = 0  # subsampling seed


class TrainConfig(_Strict):
    epochs: int = Field(30, ge=0)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    max_length: int = Field(512, ge=8)
    max_grad_norm: Optional[float] = Field(1.0, gt=0)
    # the training forward passes' precision, the frozen reference model's included: fp32, or bf16 autocast (weights,
    # gradients and the optimizer stay fp32); trainables/precision.py. Evaluation runs in fp32 either way (metrics.py)
    precision: Literal["fp32", "bf16"] = "fp32"
    # batches of documents of similar length (less padding): a different, equally seeded order of the same
    # documents; off for runs with replay (replayed documents of any length join every batch)
    group_by_length: bool = False
    # gradient accumulation: a batch in micro-batches of at most this many documents (the same update)
    micro_batch_size: Optional[int] = Field(None, ge=1)
    # a CUDA out-of-memory inside a step: fail (naming the size that did not fit) or halve the micro-batch and
    # run the step again (recorded in metrics.json: oom_events)
    oom: Literal["fail", "halve_batch"] = "fail"


class Rho1Options(_Strict):
    """RHO-1, two definitions (trainables/weighting.py: Rho1; README "Method definitions")."""

    # fraction of tokens dropped: keep the top (1 - k) (release: k = 0.6, so 40 % kept)
    k: float = Field(0.6, gt=0.0, lt=1.0)
    # excess_loss: the RHO-1 paper's selection, the top (1 - k) of each sequence by l_θ - l_ref, loss
    # normalised by Σw. release: the authors' TAALM release (evaluation_run.py, rho_train): the change in
    # probability p_θ - p_ref, `argsort(score) / L > k` (sort indices used as ranks), loss Σ nll·w / (k · tokens)
    selection: Literal["excess_loss", "release"] = "excess_loss"
    # the reference model: `initial` (the frozen initial θ) or a directory holding a causal LM with θ's
    # tokenizer (local files only; a relative path is taken from the working directory)
    reference: str = "initial"
    # release with reference `initial`: the width the reference table's documents are padded to (the
    # release: token_max_length = 512); it must hold train.max_length
    table_length: int = Field(512, ge=2)

    @field_validator("reference")
    @classmethod
    def _reference_model_dir(cls, v: str) -> str:
        if v == "initial":
            return v
        p = Path(v).expanduser()
        if not p.is_dir():
            raise ValueError(f"must be `initial` or a directory holding a causal LM (config.json, weights, "
                             f"tokenizer): {str(p)!r} is not a directory")
        if not (p / "config.json").is_file():
            raise ValueError(f"{str(p)!r} holds no config.json: not a saved causal LM (save one with "
                             "save_pretrained, with its tokenizer)")
        return str(p.resolve())


class RandomOptions(_Strict):
    mode: Literal["uniform", "bernoulli"] = "bernoulli"
    p: float = Field(0.5, ge=0.0, le=1.0)  # Bernoulli mean when `match` is unset
    # another scheme whose per-sequence mean weight the Bernoulli weights copy (the matched scheme)
    match: Optional[str] = None


class TrainAttentionOptions(_Strict):
    phi: Optional[str] = None  # a φ checkpoint directory (written by `taalm meta-train`)


class WeightingConfig(_Strict):
    # one scheme, or several multiplied together: "train_attention*known_mask" or a list
    scheme: Union[str, list[str]] = "uniform"
    rho1: Rho1Options = Rho1Options()
    random: RandomOptions = RandomOptions()
    train_attention: TrainAttentionOptions = TrainAttentionOptions()

    @field_validator("scheme")
    @classmethod
    def _known_schemes(cls, v):
        for name in scheme_names(v):
            SCHEMES.check(name)
        return v

    @field_validator("random")
    @classmethod
    def _known_match(cls, v):
        if v.match is not None and (v.match not in SCHEMES or v.match == "random"):
            raise ValueError(f"random.match must name another scheme; known: {', '.join(SCHEMES.names())}")
        return v

    def uses(self, name: str) -> bool:
        """Whether scheme ``name`` computes weights in this run (in the product, or as random's matched scheme)."""
        return name in scheme_names(self.scheme) or (self.random.match == name and "random" in scheme_names(self.scheme))

    @model_validator(mode="after")
    def _one_own_normaliser(self):
        if self.rho1.selection == "release" and scheme_names(self.scheme).count("rho1") > 1:
            raise ConfigKeyError(("scheme",), "rho1 with selection: release normalises the loss itself (by k · the "
                                              "other schemes' weight); a product may hold it once")
        return self


def scheme_names(scheme: Union[str, list[str]]) -> list[str]:
    parts = scheme if isinstance(scheme, list) else str(scheme).split("*")
    names = [p.strip() for p in parts]
    if not names or any(not n for n in names):
        raise ValueError(f"empty weighting scheme name in {scheme!r}")
    return names


class RecAdamOptions(_Strict):
    anneal: Literal["sigmoid", "linear", "constant"] = "sigmoid"
    k: float = Field(0.5, gt=0)
    t0: int = Field(250, ge=1)  # annealing midpoint, in optimizer steps
    pretrain_coef: float = Field(5000.0, ge=0)  # γ of the quadratic pull towards θ*


class EWCOptions(_Strict):
    lam: float = Field(1.0, ge=0)  # λ of the penalty λ/2 · Σ F (θ - θ*)²
    # the documents the Fisher information is estimated on: general text, as for replay (disjoint, ntf, a file)
    pool: str = "disjoint"
    batches: int = Field(4, ge=1)  # batches of train.batch_size documents


class RegularizerConfig(_Strict):
    kind: str = "none"  # a name of trainables.registry.REGULARIZERS: none, recadam, ewc
    recadam: RecAdamOptions = RecAdamOptions()
    ewc: EWCOptions = EWCOptions()

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, v: str) -> str:
        return REGULARIZERS.check(v)


class GeReOptions(_Strict):
    loss: Literal["margin", "kl", "l1", "l2"] = "margin"  # margin = threshold-margin (TM) on hidden states
    threshold: float = Field(0.1, ge=0)  # TM: no penalty while |h - h_ref| stays within this margin
    coef: float = Field(1.0, ge=0)
    layers: list[int] = []  # hidden-state layers constrained; default: the last


class SeekrOptions(_Strict):
    head_budget: int = Field(8, ge=1)  # attention heads distilled
    coef: float = Field(1.0, ge=0)
    alpha: float = Field(0.5, ge=0, le=1)  # ranking: alpha·forgettability + (1-alpha)·sensitivity (normalised)
    probe_batches: int = Field(2, ge=1)  # batches used to rank heads


class ReplayConfig(_Strict):
    kind: str = "none"  # a name of trainables.registry.REPLAYS: none, mix_review, gere, seekr
    # disjoint: evidence of LAMA facts outside TO-LEARN and NOT-TO-FORGET; ntf: the release's (leaky)
    # choice, replaying the NOT-TO-FORGET evidence itself; or a JSONL file with a `text` field per line
    pool: str = "disjoint"
    ratio: float = Field(1.0, gt=0)  # replayed documents per new document in each batch
    size: Optional[int] = Field(None, ge=1)  # buffer size (seeded subsample of the pool)
    gere: GeReOptions = GeReOptions()
    seekr: SeekrOptions = SeekrOptions()

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, v: str) -> str:
        return REPLAYS.check(v)


class EvalConfig(_Strict):
    batch_size: int = Field(32, ge=1)


class CheckpointConfig(_Strict):
    every: int = Field(1, ge=0)  # epochs between checkpoints; 0 = never


class RunConfig(_Strict):
    seed: int = 0
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    model: ModelConfig = ModelConfig()
    params: ParamsConfig = ParamsConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    weighting: WeightingConfig = WeightingConfig()
    regularizer: RegularizerConfig = RegularizerConfig()
    replay: ReplayConfig = ReplayConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    @model_validator(mode="after")
    def _stable_recadam(self):
        r = self.regularizer
        if r.kind == "recadam" and r.recadam.pretrain_coef * self.train.lr >= 2.0:
            raise ConfigKeyError(("regularizer", "recadam", "pretrain_coef"),
                            f"regularizer.recadam.pretrain_coef × train.lr must be < 2, or the pull towards the "
                            f"pre-trained weights overshoots and diverges (here {r.recadam.pretrain_coef:g} × "
                            f"{self.train.lr:g} = {r.recadam.pretrain_coef * self.train.lr:g})")
        return self

    @model_validator(mode="after")
    def _table_holds_documents(self):
        w = self.weighting
        if (w.uses("rho1") and w.rho1.selection == "release" and w.rho1.reference == "initial"
                and w.rho1.table_length < self.train.max_length):
            raise ConfigKeyError(("weighting", "rho1", "table_length"),
                                 f"the release-style reference table pads each document to table_length tokens; it "
                                 f"must hold the longest training document, train.max_length = {self.train.max_length} "
                                 f"(here {w.rho1.table_length})")
        return self

    @model_validator(mode="after")
    def _attention_maps_need_eager(self):
        if self.model.attention != "eager" and self.replay.kind == "seekr":
            raise ConfigKeyError(("model", "attention"), "SEEKR distils attention maps, which only the eager attention "
                                                         "returns: model.attention must be eager with replay.kind seekr")
        return self

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not (v.startswith("cuda:") and v[5:].isdigit()):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return v


def load_config(path: str | Path | None, overrides: list[str] | None = None,
                schema: type[BaseModel] = RunConfig):
    """Read a YAML file (or nothing), apply overrides, validate: the one entry point for configs."""
    if path is None:
        data, lines, source = {}, {}, ""
    else:
        data, lines = load_yaml(path)
        source = str(path)
    touched = apply_overrides(data, overrides)
    return validate(schema, data, source, lines, touched)
