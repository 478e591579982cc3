"""LORS for ``nn.Linear``: ``y = x W_s^T + (x A^T) B^T + b``, never forming ``W_i`` (no ``W_s`` term
in a private-only stack).

Three GEMMs on the rows ``X (M, in)``: ``Z = X A^T`` (M, k), ``Y = b + Z B^T`` (the small product
writes ``Y`` once) and ``Y += X W_s^T``, the dense product accumulated into ``Y`` by the GEMM itself
(``addmm_``, beta = 1), which reads ``Y`` tile by tile inside its compute-bound kernel: no temporary
``(M, out)`` product and no separate pass over the output (README, Benchmarks). Autograd is
unaffected: no backward reads ``Y``, so updating it in place is safe, and the gradients are those of
the unfused expression. Nothing is cached (a fused ``[W_s; A]`` weight per layer would copy ``W_s``
into every layer), so optimizer steps on ``W_s``, ``A`` and ``B`` apply at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import LorsLayer


class LorsLinear(LorsLayer):
    layer_kind = "linear"
    dense_types = (nn.Linear,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        if self.materialized:
            return F.linear(x, self.formed_weight(), self.bias)  # (out, in) W_i = B_i A_i
        if self.shared is None:
            return F.linear(F.linear(x, self.lors_A), self.lors_B, self.bias)  # (..., k) -> (..., out)
        rows = x.reshape(-1, x.shape[-1])  # (M, in)
        z = rows @ self.lors_A.T  # (M, k)
        y = z @ self.lors_B.T if self.bias is None else torch.addmm(self.bias, z, self.lors_B.T)  # (M, out)
        if torch.is_autocast_enabled(x.device.type):  # autocast casts addmm, never an in-place addmm_
            y = torch.addmm(y, rows, self.shared.T)
        else:
            y.addmm_(rows, self.shared.T)  # (M, out) += (M, in) (in, out)
        return y.view(*x.shape[:-1], y.shape[-1])
