"""Accumulating Gram matrices ``sum_t r_t^T r_t`` with half the work: only the upper block triangle.

A Gram is symmetric, but ``addmm`` computes all of it. :func:`add_gram` adds ``r^T r`` to the block
rows of the upper triangle (diagonal blocks whole), ``(1 + 1/blocks) / 2`` of the products;
:func:`symmetrize_` mirrors the upper blocks into the lower ones once, when the sum is complete.
Widths below ``2 * BLOCK`` are accumulated whole (the saving would not pay for the extra calls).
"""
from __future__ import annotations

import torch

BLOCK = 256


def add_gram(acc: torch.Tensor | None, r: torch.Tensor) -> torch.Tensor:
    """``acc += r^T r`` on the upper block triangle (``r``: (rows, n), ``acc``: (n, n) or None: a new
    sum). Call :func:`symmetrize_` on the final sum."""
    n = r.shape[1]
    if acc is None:
        acc = torch.zeros(n, n, dtype=r.dtype, device=r.device)
    if n < 2 * BLOCK:
        return acc.addmm_(r.T, r)
    for i in range(0, n, BLOCK):
        block = r[:, i:i + BLOCK]  # (rows, b)
        acc[i:i + BLOCK, i:].addmm_(block.T, r[:, i:])  # (b, n - i): one block row, from the diagonal on
    return acc


def symmetrize_(acc: torch.Tensor) -> torch.Tensor:
    """Complete a sum of :func:`add_gram`: copy its upper blocks into the lower ones (in place)."""
    n = acc.shape[0]
    if n < 2 * BLOCK:
        return acc
    for i in range(0, n, BLOCK):
        acc[i + BLOCK:, i:i + BLOCK] = acc[i:i + BLOCK, i + BLOCK:].T
    return acc


__all__ = ["BLOCK", "add_gram", "symmetrize_"]
