"""The forward passes' precision (``train.precision``, ``meta.precision``): one autocast for θ, its reference model
and φ, so that what is compared runs the same way."""

from __future__ import annotations

import contextlib

import torch


def autocast(device, precision: str):
    """``fp32`` (no autocast: the results of every earlier version, bit for bit) or ``bf16`` (torch.autocast to
    bfloat16 on the device's type; weights, gradients and optimizer stay fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
