"""LORS for transformers' GPT-2 ``Conv1D``, whose weight is stored ``(in, out)``: ``y = x W + b``.

The factorized matrix is the weight as stored, so ``B`` is ``(in, k)`` and ``A`` is ``(k, out)``:
``y = x W_s + (x B) A + b`` (``(x B) A + b`` in a private-only stack), the dense product
accumulated into the low-rank one by its GEMM (``addmm_``), as in :mod:`.linear`.
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
        rows = x.reshape(-1, x.shape[-1])  # (M, in)
        y = torch.addmm(self.bias, rows @ self.lors_B, self.lors_A)  # (M, k) -> (M, out)
        if self.shared is not None:
            y.addmm_(rows, self.shared)  # (M, out) += (M, in) (in, out)
        return y.reshape(*x.shape[:-1], y.shape[-1])
