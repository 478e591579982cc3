"""LORS for transformers' GPT-2 ``Conv1D``, whose weight is stored ``(in, out)``: ``y = x W + b``.

The factorized matrix is the weight as stored, so ``B`` is ``(in, k)`` and ``A`` is ``(k, out)``:
``y = x W_s + (x B) A + b``.
"""
from __future__ import annotations

import torch

from .base import LorsLayer


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for the core
        return ()
    return (Conv1D,)


class LorsConv1D(LorsLayer):
    layer_kind = "conv1d"
    dense_types = _conv1d_type()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        y = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.shared)  # (M, out)
        y = y + (x.reshape(-1, x.shape[-1]) @ self.lors_B) @ self.lors_A  # (M, k) -> (M, out)
        return y.reshape(*x.shape[:-1], y.shape[-1])
