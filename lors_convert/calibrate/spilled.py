"""Calibration Grams kept on disk in their eigenbasis, read back one stacked parameter at a time.

A model's float64 input and output-gradient Grams are several times its size, and every fit needs the eigendecomposition ``C = Q diag(lam) Q^T`` of
its Grams (:func:`lors_convert.decompose.whitener.gram_eigh`), not ``C`` itself. So when collection
ends each distinct Gram is decomposed once, in float32 (the calibrated fit floors eigenvalues at
``DEFAULT_FLOOR`` of the largest and adds a ridge of ``CONVERSION_DAMP`` times their mean, both far
above float32's rounding), written
as ``lam`` and ``Q``, and dropped from memory. Keys that saw the same inputs (q/k/v projections)
share one stored Gram.

:class:`SpilledGrams` is a read-only mapping of weight key -> Gram (rebuilt from the eigenbasis,
for callers that want the matrix) with :meth:`SpilledGrams.eig` for the fits.
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor

import torch

from ..decompose.topk import serial
from ..decompose.whitener import gram_eigh
from ..heap import trim
from ..io.spill import Spill

MAX_EIGH_WORKERS = 4  # eigendecompositions run side by side when Grams are spilled


class SpilledGrams(Mapping):
    """Weight key -> Gram, stored on ``spill`` as its eigendecomposition."""

    def __init__(self, spill: Spill, kind: str):
        self.spill, self.kind = spill, kind
        self._names: dict[str, str] = {}  # weight key -> stored name
        self._live: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # name -> Q while in use
        self._lam: dict[str, torch.Tensor] = {}  # name -> lam of the live Q
        self._sizes: dict[str, int] = {}  # weight key -> n

    def put(
        self, keys: list[str], gram: torch.Tensor, eig: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> None:
        """Decompose ``gram`` (the Gram of every key in ``keys``; ``eig``: its decomposition, already
        computed) and write it out."""
        lam, Q = eig if eig is not None else _eigh(gram)  # (n,), (n, n)
        name = f"{self.kind}:{keys[0]}"
        self.spill.put(name, {"lam": lam.to(torch.float64), "Q": Q})
        for key in keys:
            self._names[key] = name
            self._sizes[key] = int(lam.shape[0])

    def size(self, key: str) -> int:
        """The side ``n`` of the Gram of ``key``, without reading it."""
        return self._sizes[key]

    def eig(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lam, Q)``, ``lam`` float64, ``Q`` float32 as stored; the same tensors while a caller
        still holds them (q/k/v share one)."""
        name = self._names[key]
        Q = self._live.get(name)
        if Q is None:
            stored = self.spill.get(name)
            Q = stored["Q"]
            self._live[name] = Q
            self._lam[name] = stored["lam"]
            weakref.finalize(Q, self._lam.pop, name, None)
        return self._lam[name], Q

    def __getitem__(self, key: str) -> torch.Tensor:
        lam, Q = self.eig(key)
        Q = Q.to(torch.float64)
        return (Q * lam) @ Q.T  # (n, n)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, key) -> bool:
        return key in self._names


def _eigh(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return gram_eigh(gram, torch.float32)  # faster than float64; the floor lies far above its rounding


def spill_grams(
    grams: dict[str, torch.Tensor] | Iterator[tuple[str, torch.Tensor]],
    spill: Spill,
    kind: str,
    into: SpilledGrams | None = None,
) -> SpilledGrams:
    """Move ``grams`` onto ``spill`` (adding to ``into`` when given). A dict is consumed (each entry
    dropped once written; keys whose Grams are the same tensor object are stored once); an iterator
    of ``(key, Gram)`` is read as the decompositions need its Grams, a few ahead at most."""
    out = into if into is not None else SpilledGrams(spill, kind)
    # each eigensolver on one BLAS thread, as many side by side as torch has threads, a few
    # decompositions ahead of the writes at most
    workers = max(1, min(MAX_EIGH_WORKERS, torch.get_num_threads()))
    with serial(), ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for keys, gram in _distinct(grams):
            pending.append((keys, pool.submit(_eigh, gram)))
            del gram
            if len(pending) > workers:
                keys, eig = pending.popleft()
                out.put(keys, None, eig.result())
        for keys, eig in pending:
            out.put(keys, None, eig.result())
    trim()  # the sums are gone: give their pages back before the next phase
    return out


def _distinct(grams) -> Iterator[tuple[list[str], torch.Tensor]]:
    """``(keys, Gram)``: a dict's keys grouped by tensor object (popped as they go), an iterator's one by one."""
    if not isinstance(grams, dict):
        yield from (([key], g) for key, g in grams)
        return
    by_tensor: dict[int, list[str]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for key, g in grams.items():
        by_tensor.setdefault(id(g), []).append(key)
        tensors[id(g)] = g
    grams.clear()
    for ident, keys in by_tensor.items():
        yield keys, tensors.pop(ident)


__all__ = ["SpilledGrams", "spill_grams"]
