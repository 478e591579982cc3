"""LORS for ``nn.Conv2d`` (1x1, kxk, strided, dilated, grouped).

The weight ``(out, in/g, kh, kw)`` is factorized as the matrix ``(out, in/g*kh*kw)``. Its low-rank
part is two convolutions: ``A`` reshaped to ``(k, in/g, kh, kw)`` and repeated for each of the ``g``
groups (same stride, padding, dilation), then ``B`` as a grouped 1x1 conv ``(out, k, 1, 1)``. For
output channel ``o`` of group ``j`` this computes ``(B A)[o] * x_j``: exactly the grouped conv with
weight ``B A``, so grouping is respected without materializing ``W_i``. A private-only stack has
no shared convolution: the bias goes to the 1x1 one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import LorsLayer


class LorsConv2d(LorsLayer):
    layer_kind = "conv2d"
    dense_types = (nn.Conv2d,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, in, H, W) -> (N, out, H', W')
        t = self.template
        out, in_per_group, kh, kw = self.weight_shape
        if self.total_rank == 0:  # a budget's rank 0: torch rejects a zero-size grouped conv
            W = (
                self.lors_B.new_zeros(self.weight_shape)
                if self.shared is None
                else self.shared.view(self.weight_shape)
            )
            return t._conv_forward(x, W, self.bias)  # (N, out, H', W')
        A = self.lors_A.view(-1, in_per_group, kh, kw).repeat(t.groups, 1, 1, 1)  # (g*k, in/g, kh, kw)
        z = t._conv_forward(x, A, None)  # (N, g*k, H', W')
        B = self.lors_B.view(out, -1, 1, 1)  # (out, k, 1, 1)
        if self.shared is None:
            return F.conv2d(z, B, self.bias, groups=t.groups)  # (N, out, H', W')
        y = t._conv_forward(x, self.shared.view(self.weight_shape), self.bias)  # (N, out, H', W')
        return y.add_(F.conv2d(z, B, groups=t.groups))  # in place: no backward reads y
