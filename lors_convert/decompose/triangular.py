"""Products with a lower-triangular matrix that skip its zero triangle. Pure functions.

For ``L`` (n, n) lower triangular, column block ``J = s .. s + b`` of ``R L`` reads only rows ``s..n``
of ``L`` (the rows above are zero in those columns)::

    (R L)[:, J] = R[:, s:] L[s:, J]        (L^T Z)[J, :] = L[s:, J]^T Z[s:, :]

so in blocks of ``b`` columns the product costs about ``m n (n + b) / 2`` multiply-adds instead of
``m n^2`` (torch has no triangular matrix product, BLAS's ``trmm``). The whiteners apply their
Cholesky factors this way (:mod:`.whitener`). A side of at most one block is one plain product.
"""

from __future__ import annotations

import torch

BLOCK = 512  # columns of L per product (docs/benchmarks.md, "Calibrated conversion")


def lower_right(R: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """``R @ L`` for ``R`` (m, n) and a lower-triangular ``L`` (n, n), as a fresh tensor."""
    n = L.shape[0]
    if n <= BLOCK:
        return R @ L  # (m, n)
    out = R.new_empty(R.shape[0], n)  # (m, n)
    for s in range(0, n, BLOCK):
        out[:, s : s + BLOCK] = R[:, s:] @ L[s:, s : s + BLOCK]  # (m, b)
    return out


def lower_t_left(L: torch.Tensor, Z: torch.Tensor) -> torch.Tensor:
    """``L^T @ Z`` for a lower-triangular ``L`` (n, n) and ``Z`` (n, m), as a fresh tensor."""
    n = L.shape[0]
    if n <= BLOCK:
        return L.T @ Z  # (n, m)
    out = Z.new_empty(n, Z.shape[1])  # (n, m)
    for s in range(0, n, BLOCK):
        out[s : s + BLOCK] = L[s:, s : s + BLOCK].T @ Z[s:]  # (b, m)
    return out


__all__ = ["BLOCK", "lower_right", "lower_t_left"]
