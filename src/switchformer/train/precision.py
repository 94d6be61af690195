"""Mixed precision: bf16 autocast where the device supports it (``precision``), the router kept in
float32 inside it (the layer does that itself)."""

from __future__ import annotations

import contextlib

import torch

from switchformer.train.config import TrainConfig


def autocast_context(config: TrainConfig, device: torch.device):
    use_bf16 = config.precision == "bf16" or (
        config.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
