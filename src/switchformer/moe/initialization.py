"""Weight initialisation of the Switch paper (section 2.4): truncated normal, ``std = sqrt(s / fan_in)``.

The paper reduced the default scale ``s = 1.0`` to ``s = 0.1`` for stability; values beyond two
standard deviations are redrawn (truncation at +-2 std).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


@torch.no_grad()
def scaled_trunc_normal_(tensor: Tensor, fan_in: int, scale: float = 0.1) -> Tensor:
    std = math.sqrt(scale / fan_in)
    return torch.nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2 * std, b=2 * std)
