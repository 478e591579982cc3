"""LORS for transformers' GPT-2 ``Conv1D``, whose weight is stored ``(in, out)``: ``y = x W + b``.

The factorized matrix is the weight as stored, so ``B`` is ``(in, k)`` and ``A`` is ``(k, out)``:
``y = x W_s + (x B) A + b`` (``(x B) A + b`` in a private-only stack), the dense product
accumulated into the low-rank one by its GEMM (``addmm_``), as in :mod:`.linear`.
"""

from __future__ import annotations

import sys

import torch

from .base import LorsLayer


def hf_conv1d_types() -> tuple[type, ...]:
    """transformers' ``Conv1D`` if its module is loaded, else ``()``. A model holding a ``Conv1D``
    has loaded it, so recognising one needs no import of transformers (which takes seconds, paid
    by every model that is not a Hugging Face one)."""
    module = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(module, "Conv1D", None)
    return (conv1d,) if isinstance(conv1d, type) else ()


class LorsConv1D(LorsLayer):
    layer_kind = "conv1d"

    @classmethod
    def replaces(cls) -> tuple[type, ...]:
        return hf_conv1d_types()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        rows = x.reshape(-1, x.shape[-1])  # (M, in)
        if self.materialized:
            y = torch.addmm(self.bias, rows, self.formed_weight())  # (M, in) (in, out) W_i = B_i A_i
            return y.reshape(*x.shape[:-1], y.shape[-1])
        y = torch.addmm(self.bias, rows @ self.lors_B, self.lors_A)  # (M, k) -> (M, out)
        if self.shared is not None:
            if torch.is_autocast_enabled(x.device.type):  # autocast casts addmm, never an in-place addmm_
                y = torch.addmm(y, rows, self.shared)
            else:
                y.addmm_(rows, self.shared)  # (M, out) += (M, in) (in, out)
        return y.reshape(*x.shape[:-1], y.shape[-1])
