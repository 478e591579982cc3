"""A stacked parameter's layers as the calibrated fit reads them: layer ``i`` as a float64 matrix
in linear orientation ``(out, in)`` (``y = W_i x``), widened from the stored tensor when asked for.

The fit's float64 math needs one layer at a time (each whitened SVD, each residual, each term of the
shared part's sums), so the stack is never held widened: it costs what the source's tensors already
cost, where a float64 copy of all ``N`` layers would cost ``8 N out in`` bytes more (11.5 GB for a
7B model's 32 MLP matrices of 11008 x 4096). Widening is exact, so every result is bit-identical to
a fit on a float64 stack.

Orientation: ``nn.Linear`` and conv kernels are stored ``(out, in)`` / ``(out, in*kh*kw)`` (linear
orientation), HF ``Conv1D`` ``(in, out)`` (``orientation="in_out"``, transposed on the way in).
"""

from __future__ import annotations

import torch

from .lorst import as_matrix


def orient(M: torch.Tensor, orientation: str) -> torch.Tensor:
    """A matrix between stored and linear orientation (its own inverse)."""
    return M.transpose(-1, -2) if orientation == "in_out" else M


class LayerStack:
    """``N`` stored weights read as float64 ``(out, in)`` matrices, one at a time, on ``device``.

    Indexing gives a contiguous float64 layer (the stored tensor itself when it already is one: read
    it, never write it); ``len`` and ``shape`` (``(N, out, in)``) are those of the stack it stands
    for. A float64 tensor ``(N, out, in)`` can stand in for it wherever it is read."""

    def __init__(self, weights: list[torch.Tensor], orientation: str, device: torch.device):
        self.weights = weights
        self.orientation = orientation
        self.device = device
        first = orient(as_matrix(weights[0]), orientation)
        self.shape = (len(weights), *first.shape)

    def __len__(self) -> int:
        return len(self.weights)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.read(self.weights[i]).contiguous()  # (out, in)

    def read(self, matrix: torch.Tensor) -> torch.Tensor:
        """A matrix stored like the layers (a shared part) as the fit reads them: float64, linear
        orientation, on the stack's device (a view where no copy is needed)."""
        return orient(as_matrix(matrix).to(device=self.device, dtype=torch.float64), self.orientation)


__all__ = ["LayerStack", "orient"]
