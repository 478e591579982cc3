"""NaN/Inf checks of whole tensors without a temporary the size of the tensor.

``torch.isfinite(t).all()`` materializes ``|t|`` and two masks. A sum is finite exactly when every
summand is, unless the sum overflows; so the sum is the check, and only an overflowing or
non-finite sum pays for an elementwise pass, a slice of rows at a time.
"""

from __future__ import annotations

import math

import torch

SLICE_ELEMENTS = 1 << 22  # elements checked together on the slow path


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is finite (always True for integer and meta tensors)."""
    if not (t.is_floating_point() or t.is_complex()) or t.device.type == "meta":
        return True
    if t.is_floating_point():
        wide = torch.float64 if t.dtype == torch.float64 else torch.float32  # float16 sums overflow early
        if math.isfinite(float(t.sum(dtype=wide))):
            return True
    rows = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(-1, 1)  # (rows, cols), a view
    step = max(1, SLICE_ELEMENTS // max(1, rows.shape[1]))
    return all(bool(torch.isfinite(rows[i : i + step]).all()) for i in range(0, rows.shape[0], step))


def first_non_finite(tensors, names: list[str]) -> str | None:
    """The name of the first tensor with a NaN or Inf, or None."""
    return next((name for t, name in zip(tensors, names, strict=False) if not all_finite(t)), None)
