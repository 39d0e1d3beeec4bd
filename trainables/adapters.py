"""K-Adapter as a parameterisation: the base model stays frozen (bit-identical), small bottleneck
adapters attached after chosen decoder layers are the only trainable parameters.

Each adapter maps the layer's output hidden states h to h + up(act(down(LayerNorm(h)))); ``up`` is
zero-initialised so the adapted model starts exactly at the base model. Adapters are registered as a
submodule (``taalm_adapters``), so they appear in ``named_parameters``/``state_dict``, checkpoints and
``torch.func.functional_call``; they act through forward hooks on the layers (PyTorch's own extension
point; no module attribute is swapped).
"""

from __future__ import annotations

import torch
from .config import KAdapterOptions
from .errors import InputError


class Adapter(torch.nn.Module):
    def __init__(self, hidden: int, bottleneck: int, dtype: torch.dtype):
        super().__init__()
        self.norm = torch.nn.LayerNorm(hidden, dtype=dtype)
        self.down = torch.nn.Linear(hidden, bottleneck, dtype=dtype)
        self.up = torch.nn.Linear(bottleneck, hidden, dtype=dtype)
        torch.nn.init.zeros_(self.up.weight)
        torch.nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(torch.nn.functional.gelu(self.down(self.norm(h))))


def _decoder_layers(model) -> torch.nn.ModuleList:
    body = model.base_model
    for attr in ("layers", "h", "layer", "blocks"):
        layers = getattr(body, attr, None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    raise InputError("params.kind", f"kadapter: cannot find the decoder layers of {type(model).__name__}")


def _hook(adapter: Adapter):
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (adapter(output[0]),) + tuple(output[1:])
        return adapter(output)

    return hook


def apply_kadapter(model, options: KAdapterOptions):
    layers = _decoder_layers(model)
    n = len(layers)
    chosen = options.layers or sorted({0, n // 2, n - 1})
    bad = [i for i in chosen if not 0 <= i < n]
    if bad:
        raise InputError("params.kadapter.layers", f"layer {bad[0]} out of range: the model has {n} layers")
    for p in model.parameters():
        p.requires_grad_(False)
    dtype = next(model.parameters()).dtype
    hidden = model.config.hidden_size
    model.taalm_adapters = torch.nn.ModuleDict(
        {str(i): Adapter(hidden, options.bottleneck, dtype).to(next(model.parameters()).device) for i in chosen})
    for i in chosen:
        layers[i].register_forward_hook(_hook(model.taalm_adapters[str(i)]))
    return model
