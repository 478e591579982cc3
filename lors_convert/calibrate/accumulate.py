"""Accumulating Gram matrices ``sum_t r_t^T r_t`` with half the work and 60% of the memory.

A Gram is symmetric, but ``addmm`` computes all of it. :func:`add_gram` adds ``r^T r`` to the block
rows of the upper triangle only (diagonal blocks whole), ``(1 + 1/blocks) / 2`` of the products, held
in an :class:`UpperBlocks` (block row ``i`` is ``(b, n - i)``: columns ``i..n``), which stores no
more than it computes (1536 wide: 58% of the square); :func:`completed` mirrors it into the full
``(n, n)`` matrix once, when the sum is complete. Widths below ``2 * BLOCK`` are accumulated whole
as a plain tensor (the saving would not pay for the extra calls).
"""

from __future__ import annotations

import torch

from ..finite import all_finite

BLOCK = 256


class UpperBlocks:
    """A symmetric ``(n, n)`` sum stored as its upper block rows."""

    def __init__(self, rows: list[torch.Tensor], n: int):
        self.rows, self.n = rows, n  # rows[k]: (b_k, n - k BLOCK)

    @classmethod
    def zeros(cls, n: int, dtype: torch.dtype, device) -> UpperBlocks:
        return cls(
            [torch.zeros(min(BLOCK, n - i), n - i, dtype=dtype, device=device) for i in range(0, n, BLOCK)], n
        )

    def add_rows_(self, r: torch.Tensor) -> UpperBlocks:
        """``+= r^T r`` (``r``: (rows, n))."""
        for row, i in zip(self.rows, range(0, self.n, BLOCK), strict=False):
            row.addmm_(r[:, i : i + BLOCK].T, r[:, i:])  # (b, n - i): one block row, from the diagonal on
        return self

    def __iadd__(self, other: UpperBlocks) -> UpperBlocks:
        for a, b in zip(self.rows, other.rows, strict=True):
            a.add_(b)
        return self

    def clone(self) -> UpperBlocks:
        return UpperBlocks([row.clone() for row in self.rows], self.n)

    def full(self) -> torch.Tensor:
        """The whole symmetric matrix ``(n, n)``; the block rows are released as they are copied."""
        first = self.rows[0]
        out = torch.empty(self.n, self.n, dtype=first.dtype, device=first.device)
        for i in range(0, self.n, BLOCK):
            row = self.rows.pop(0)  # (b, n - i)
            b = row.shape[0]
            out[i : i + b, i:] = row
            out[i + b :, i : i + b] = row[:, b:].T
        return out


def add_gram(acc: torch.Tensor | UpperBlocks | None, r: torch.Tensor) -> torch.Tensor | UpperBlocks:
    """``acc += r^T r`` (``r``: (rows, n); ``acc`` None: a new sum): a tensor below ``2 * BLOCK``
    columns, else an :class:`UpperBlocks`. :func:`completed` gives the matrix."""
    n = r.shape[1]
    if n < 2 * BLOCK:
        acc = torch.zeros(n, n, dtype=r.dtype, device=r.device) if acc is None else acc
        return acc.addmm_(r.T, r)
    acc = UpperBlocks.zeros(n, r.dtype, r.device) if acc is None else acc
    return acc.add_rows_(r)


def completed(acc: torch.Tensor | UpperBlocks) -> torch.Tensor:
    """The full symmetric ``(n, n)`` matrix of a sum of :func:`add_gram` (a fresh tensor or ``acc``)."""
    return acc.full() if isinstance(acc, UpperBlocks) else acc


def all_finite_sum(acc: torch.Tensor | UpperBlocks) -> bool:
    """Whether every stored entry of a sum is finite."""
    return all(all_finite(t) for t in (acc.rows if isinstance(acc, UpperBlocks) else [acc]))


def stored_bytes(n: int, element_size: int = 4) -> int:
    """Bytes an accumulator of width ``n`` holds."""
    if n < 2 * BLOCK:
        return n * n * element_size
    return sum(min(BLOCK, n - i) * (n - i) for i in range(0, n, BLOCK)) * element_size


__all__ = ["BLOCK", "UpperBlocks", "add_gram", "all_finite_sum", "completed", "stored_bytes"]
