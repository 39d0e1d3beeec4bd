"""θ, built once from config: the one place a base model becomes the model a loop trains.

    theta = build_theta(cfg.model, cfg.params, device, seed=cfg.seed, needs_reference_model=True)

Every loop and command (the continual update, meta-training, TemporalWiki, `taalm data tailor`) builds θ
here: tokenizer, base model (the parameterisation's loading options; placed on the device unless the
parameterisation places it itself, as QLoRA does), a frozen copy when the reference model needs one,
the adapters (initialised from the run seed, so they do not depend on what ran before), and the forward
of the frozen initial θ when a component needs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .config import ModelConfig, ParamsConfig
from .errors import InputError
from .models import load_base_model, load_tokenizer
from .params import Parameterisation, build_parameterisation, frozen_copy
from .seeds import seed_everything


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("device", f"{name!r} requested but CUDA is not available")
    return torch.device(name)


@dataclass
class Theta:
    tokenizer: object
    model: torch.nn.Module
    trainable: dict[str, torch.nn.Parameter]  # name -> parameter, in model order
    device: torch.device
    parameterisation: Optional[Parameterisation]  # None: the base model, nothing trains
    reference_model: Optional[Callable] = None  # forward of the frozen initial θ (when asked for)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def build_theta(model_cfg: ModelConfig, params_cfg: Optional[ParamsConfig], device: torch.device, seed: int = 0,
                needs_reference_model: bool = False, tokenizer=None) -> Theta:
    """θ with its trainable set. ``params_cfg`` None: the base model alone, every parameter frozen
    (scoring, tailoring). ``needs_reference_model``: also the forward of the frozen initial θ."""
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_cfg)
    param = build_parameterisation(params_cfg) if params_cfg is not None else None
    base = load_base_model(model_cfg, tokenizer, param.load_kwargs() if param else None)
    if param is None or param.moves_to_device:
        base = base.to(device)
    if param is None:
        return Theta(tokenizer, base, {}, device, None)
    frozen = frozen_copy(base) if needs_reference_model and param.frozen_copy else None
    seed_everything(seed)  # the adapters' initialisation depends on the seed only
    model = param.apply(base)
    reference_model = param.reference_model(model, frozen) if needs_reference_model else None
    return Theta(tokenizer, model, trainable_parameters(model), device, param, reference_model)
