"""Checks of a decoding call's (and a forward's) inputs, each naming the argument, and the decoder's
first input."""

from __future__ import annotations

import torch
from torch import Tensor


def decoder_start(model, rows: int, device) -> Tensor:
    """``[rows, 1]`` of the decoder start token: the first decoder input and first output column."""
    return torch.full((rows, 1), model.config.decoder_start_token_id, dtype=torch.long, device=device)


def check_token_ids(name: str, ids: Tensor, vocab_size: int) -> None:
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"{name}: token ids must be an integer tensor, got {ids.dtype}")
    if ids.dim() != 2:
        raise ValueError(f"{name}: expected shape [batch, sequence], got {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError(f"{name}: shape {tuple(ids.shape)} holds no token (give at least one row of one token)")
    if ids.numel() and not (0 <= (bounds := torch.aminmax(ids)).min and bounds.max < vocab_size):
        bad = ids[(ids < 0) | (ids >= vocab_size)][0].item()
        raise ValueError(f"{name}: token id {bad} is outside the vocabulary [0, {vocab_size})")


def check_mask(name: str, mask: Tensor | None, ids: Tensor) -> None:
    if mask is not None and mask.shape != ids.shape:
        raise ValueError(f"{name}: shape {tuple(mask.shape)} does not match the token ids {tuple(ids.shape)}")
