"""LORS for ``nn.Linear``: ``y = x W_s^T + (x A^T) B^T + b``, never forming ``W_i`` (no ``W_s`` term
in a private-only stack)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import LorsLayer


class LorsLinear(LorsLayer):
    layer_kind = "linear"
    dense_types = (nn.Linear,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        z = F.linear(x, self.lors_A)  # (..., k)
        if self.shared is None:
            return F.linear(z, self.lors_B, self.bias)  # (..., out)
        y = F.linear(x, self.shared, self.bias)  # (..., out)
        return y + F.linear(z, self.lors_B)  # (..., out)
