"""Parameterisations of θ (the parameterisation axis): which parameters train.

* ``lora``: LoRA adapters through peft (r, alpha, dropout, target modules); the base stays frozen.
* ``qlora``: LoRA on a 4-bit base (CUDA + bitsandbytes only; the quantised base is placed by
  ``device_map`` at load time, never moved with ``.to``).
* ``full``: every weight trains.
* ``kadapter``: K-Adapter, bottleneck adapters after chosen layers (``trainables.adapters``).

Each also says how to run the frozen initial θ (the reference model of RHO-1, GeRe, SEEKR): LoRA with its
adapters disabled, or a frozen copy taken before training (full, K-Adapter).
"""

from __future__ import annotations

import copy
from typing import Callable, Optional

import torch

from .component import Component
from .config import ParamsConfig
from .errors import InputError
from .registry import PARAMETERISATIONS


class Parameterisation(Component):
    moves_to_device = True  # the base model is placed with .to(device) before apply()
    frozen_copy = False  # the reference model is a frozen copy of the base (else: the model, adapters off)

    def __init__(self, options: ParamsConfig):
        self.options = options

    def load_kwargs(self) -> dict:
        """Extra keyword arguments of ``from_pretrained`` (quantisation)."""
        return {}

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        raise NotImplementedError

    def reference_model(self, model: torch.nn.Module, frozen: Optional[torch.nn.Module]) -> Callable:
        """Forward of the frozen initial θ: ``ref(ids, mask, hidden=False, attentions=False)``."""

        @torch.no_grad()
        def ref(ids, mask, hidden: bool = False, attentions: bool = False):
            kw = dict(input_ids=ids, attention_mask=mask, output_hidden_states=hidden, output_attentions=attentions)
            if frozen is not None:
                return frozen(**kw)
            was = model.training
            model.eval()
            try:
                with model.disable_adapter():
                    return model(**kw)
            finally:
                model.train(was)

        return ref


@PARAMETERISATIONS.register("lora")
class Lora(Parameterisation):
    def apply(self, model):
        from peft import LoraConfig, get_peft_model

        p = self.options
        lcfg = LoraConfig(r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout, target_modules=p.target_modules,
                          task_type="CAUSAL_LM")
        try:
            return get_peft_model(model, lcfg)
        except ValueError as e:
            raise InputError("params.target_modules", str(e)) from None


@PARAMETERISATIONS.register("qlora")
class QLora(Lora):
    moves_to_device = False

    def load_kwargs(self):
        if not torch.cuda.is_available():
            raise InputError("params.kind", "qlora needs a CUDA GPU (and the 'qlora' extra: bitsandbytes)")
        try:
            from transformers import BitsAndBytesConfig
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise InputError("params.kind", "qlora needs bitsandbytes: pip install '.[qlora]'") from None
        return {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True), "device_map": {"": 0}}

    def apply(self, model):
        from peft import prepare_model_for_kbit_training

        return super().apply(prepare_model_for_kbit_training(model))


@PARAMETERISATIONS.register("full")
class Full(Parameterisation):
    frozen_copy = True

    def apply(self, model):
        for p in model.parameters():
            p.requires_grad_(True)
        return model


@PARAMETERISATIONS.register("kadapter")
class KAdapter(Parameterisation):
    frozen_copy = True

    def apply(self, model):
        from .adapters import apply_kadapter

        return apply_kadapter(model, self.options.kadapter)


def build_parameterisation(options: ParamsConfig) -> Parameterisation:
    return PARAMETERISATIONS.get(options.kind, "params.kind")(options)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model).eval()
