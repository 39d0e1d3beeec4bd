"""Train-Attention φ: a causal-LM body sharing θ's tokenizer, with its LM head replaced by a
hidden -> 1 linear "TA head". w = sigmoid(head output); the output at position t+1 (where φ has
seen x_{t+1}) weights the loss term predicting x_{t+1}, as the authors' release does
(``phi(D).logits.squeeze(-1)[:, 1:]`` against the losses of ``logits[:, :-1]``; ALGORITHM.md §2, §4, §7).

The body is configurable: the same preset as θ, another model with the same tokenizer, or the first k
layers of either; LoRA (peft) or full. A φ checkpoint is a directory with ``phi.safetensors`` (the
trainable tensors) and ``phi.json`` (what to rebuild it from: body model, layers, parameterisation,
tokenizer hash, data hash, meta-training config and results).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal, Optional

import torch
from pydantic import Field
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .checkpoint import atomic_directory, write_json_atomic
from .config import ModelConfig, ParamsConfig, _Strict
from .errors import InputError, read_text
from .loss import prediction_mask
from .models import load_base_model

FORMAT = "taalm-train-attention/2"
# the weight of the loss term l_t (predicting x_{t+1}) is φ's output at position t+1
ALIGNMENT = "output[t+1] weights the prediction of x[t+1]"
# checkpoints of format /1 used φ's output at t (before it had seen x_{t+1}): refused on load
OLD_FORMATS = {"taalm-train-attention/1": "output[t] weighted the prediction of x[t+1]"}


class PhiConfig(_Strict):
    model: Optional[ModelConfig] = None  # None: the same base model as θ
    num_layers: Optional[int] = Field(None, ge=1)  # keep only the first k layers of the body
    params: ParamsConfig = ParamsConfig(kind="lora", r=8, alpha=16, dropout=0.0)
    head_bias_init: float = 4.0  # sigmoid(4) ≈ 0.98: weights start near 1
    # "default": PyTorch's nn.Linear initialisation (what the release ends up with); "normal": N(0, head_weight_std)
    head_init: Literal["default", "normal"] = "default"
    head_weight_std: float = Field(1e-3, ge=0.0)  # only for head_init: normal


class TrainAttention(torch.nn.Module):
    def __init__(self, body: torch.nn.Module, hidden_size: int, bias_init: float = 4.0,
                 weight_std: Optional[float] = None, dtype: torch.dtype = torch.float32):
        """``weight_std`` None keeps nn.Linear's default initialisation of the head weight (the release's
        effective choice: a 1e-3 head starves φ's body of gradient); a number draws N(0, weight_std)."""
        super().__init__()
        self.body = body
        self.head = torch.nn.Linear(hidden_size, 1, dtype=dtype)
        with torch.no_grad():
            if weight_std is not None:
                self.head.weight.normal_(0.0, weight_std) if weight_std > 0 else self.head.weight.zero_()
            self.head.bias.fill_(bias_init)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Head output (pre-sigmoid), [B, T]."""
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(hidden).squeeze(-1)

    def weights(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T-1] weights: entry t (the loss term predicting x_{t+1}) is sigmoid of φ's output at
        position t+1, i.e. after φ has read x_{t+1}; 0 on padding."""
        w = torch.sigmoid(self(input_ids, attention_mask))[:, 1:]
        return w * prediction_mask(attention_mask).to(w.dtype)


def tokenizer_hash(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def build_phi(phi_cfg: PhiConfig, theta_model: ModelConfig, tokenizer, seed: int = 0) -> TrainAttention:
    """Build φ: load the body (θ's preset unless phi.model is set), cut it to phi.num_layers, add the head."""
    body_cfg = phi_cfg.model or theta_model
    full = load_base_model(body_cfg, tokenizer)
    body = full.base_model  # the transformer trunk without its LM head
    if phi_cfg.num_layers is not None:
        attr = next((a for a in ("layers", "h", "layer", "blocks")
                     if isinstance(getattr(body, a, None), torch.nn.ModuleList)), None)
        if attr is None:
            raise InputError("phi.num_layers", f"cannot find the layer list of {type(body).__name__}")
        layers = getattr(body, attr)
        if phi_cfg.num_layers > len(layers):
            raise InputError("phi.num_layers", f"{phi_cfg.num_layers} > the body's {len(layers)} layers")
        setattr(body, attr, torch.nn.ModuleList(list(layers)[:phi_cfg.num_layers]))
        body.config.num_hidden_layers = phi_cfg.num_layers
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if phi_cfg.params.kind == "full":
            for p in body.parameters():
                p.requires_grad_(True)
        elif phi_cfg.params.kind == "lora":
            from peft import LoraConfig, get_peft_model

            p = phi_cfg.params
            body = get_peft_model(body, LoraConfig(r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout,
                                                   target_modules=p.target_modules))
        else:
            raise InputError("phi.params.kind", "Train-Attention supports lora or full")
        dtype = next(full.parameters()).dtype
        std = phi_cfg.head_weight_std if phi_cfg.head_init == "normal" else None
        phi = TrainAttention(body, full.config.hidden_size, phi_cfg.head_bias_init, std, dtype)
    finally:
        torch.random.set_rng_state(gen_state)
    return phi


def phi_trainable(phi: TrainAttention) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in phi.named_parameters() if p.requires_grad}


def save_phi(directory: Path, phi: Optional[TrainAttention], phi_cfg: PhiConfig, theta_model: ModelConfig, tokenizer,
             extra: dict, tensors: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Write a φ checkpoint: ``phi``'s trainable tensors, or ``tensors`` (the same names) when given."""
    tensors = tensors if tensors is not None else phi_trainable(phi)
    with atomic_directory(directory) as tmp:
        save_file({k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}, str(tmp / "phi.safetensors"))
        write_json_atomic(tmp / "phi.json", {
            "format": FORMAT, "alignment": ALIGNMENT, "phi": phi_cfg.model_dump(mode="json"),
            "theta_model": theta_model.model_dump(mode="json"), "tokenizer_hash": tokenizer_hash(tokenizer),
            **extra})


def load_phi(directory: str | Path, tokenizer, device="cpu", where: str = "weighting.train_attention.phi"):
    """Rebuild φ from a checkpoint directory; refuses a φ trained with another tokenizer."""
    d = Path(directory)
    meta_path, tensors_path = d / "phi.json", d / "phi.safetensors"
    if not meta_path.is_file() or not tensors_path.is_file():
        raise InputError(f"{where}: {d}", "not a Train-Attention checkpoint (phi.json + phi.safetensors)")
    try:
        meta = json.loads(read_text(meta_path))
    except json.JSONDecodeError as e:
        raise InputError(f"{meta_path}:{e.lineno}", f"corrupt Train-Attention metadata: {e.msg}") from None
    if isinstance(meta, dict) and meta.get("format") in OLD_FORMATS:
        raise InputError(str(meta_path), f"φ was trained with an old weight alignment "
                                         f"({OLD_FORMATS[meta['format']]}; format {meta['format']!r}); this version "
                                         f"uses {ALIGNMENT}: retrain it with `taalm meta-train` (a study's cached "
                                         f"φ: `taalm ablate ... --retrain-phi`)")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise InputError(str(meta_path), f"unknown format {found!r} (expected {FORMAT!r})")
    try:
        phi_cfg = PhiConfig.model_validate(meta["phi"])
        theta_model = ModelConfig.model_validate(meta["theta_model"])
    except (KeyError, ValueError) as e:
        raise InputError(str(meta_path), f"corrupt Train-Attention metadata: {e}") from None
    if meta.get("tokenizer_hash") != tokenizer_hash(tokenizer):
        raise InputError(f"{where}: {d}", "φ was trained with a different tokenizer than θ's")
    try:
        tensors = load_file(str(tensors_path))
    except (SafetensorError, OSError) as e:
        raise InputError(str(tensors_path), f"corrupt checkpoint: {e}") from None
    phi = build_phi(phi_cfg, theta_model, tokenizer)
    params = phi_trainable(phi)
    if set(params) != set(tensors):
        raise InputError(str(tensors_path), "tensors do not match the φ described by phi.json")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[k])
    phi.requires_grad_(False)
    return phi.to(device).eval(), meta
