"""Calibration Grams kept on disk, read back one stacked parameter at a time.

A model's float64 input and output-gradient Grams are several times its size. So when collection
ends each distinct Gram is written out in float32 (the calibrated fit adds a ridge of
``CONVERSION_DAMP`` times the mean eigenvalue, far above float32's rounding) and dropped from
memory; a fit reads the Gram back and takes its square root then
(:func:`lors_convert.decompose.whitener.whitener`), whose Cholesky factor is kept on disk beside it
from its first use (:meth:`SpilledGrams.factor`). Keys that saw the same inputs (q/k/v
projections) share one stored Gram.

:class:`SpilledGrams` is a read-only mapping of weight key -> Gram (float64) with
:meth:`SpilledGrams.load` (the stored float32 tensor) for the fits.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping

import torch

from ..decompose.whitener import gram_cholesky
from ..heap import trim
from ..io.spill import Spill


class SpilledGrams(Mapping):
    """Weight key -> Gram, stored on ``spill`` in float32."""

    def __init__(self, spill: Spill, kind: str):
        self.spill, self.kind = spill, kind
        self._names: dict[str, str] = {}  # weight key -> stored name
        self._live: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # name -> Gram while in use
        self._sizes: dict[str, int] = {}  # weight key -> n
        self._factored: set[str] = set()  # names of the factors on disk

    def put(self, keys: list[str], gram: torch.Tensor) -> None:
        """Write ``gram``, the Gram of every key in ``keys``."""
        name = f"{self.kind}:{keys[0]}"
        self.spill.put(name, {"gram": gram.to(torch.float32)})
        for key in keys:
            self._names[key] = name
            self._sizes[key] = int(gram.shape[0])

    def size(self, key: str) -> int:
        """The side ``n`` of the Gram of ``key``, without reading it."""
        return self._sizes[key]

    def load(self, key: str) -> torch.Tensor:
        """The Gram of ``key`` (n, n), float32 as stored; the same tensor while a caller still holds
        it (q/k/v share one, and so do the square roots cached for it)."""
        name = self._names[key]
        gram = self._live.get(name)
        if gram is None:
            gram = self.spill.get(name)["gram"]
            self._live[name] = gram
        return gram

    def factor(self, key: str, damp: float) -> torch.Tensor:
        """:func:`~lors_convert.decompose.whitener.gram_cholesky` of the Gram of ``key``: factored at
        its first use and kept on disk beside it, so a Gram read for every fit, solve and refit of its
        stack is factored once; the same tensor while a caller still holds it."""
        name = f"{self._names[key]}:cholesky:{damp!r}"
        L0 = self._live.get(name)
        if L0 is None:
            if name in self._factored:
                L0 = self.spill.get(name)["L0"]
            else:
                L0 = gram_cholesky(self.load(key), damp)
                self.spill.put(name, {"L0": L0})
                self._factored.add(name)
            self._live[name] = L0
        return L0

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.load(key).to(torch.float64)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, key) -> bool:
        return key in self._names


def spill_grams(
    grams: dict[str, torch.Tensor] | Iterator[tuple[str, torch.Tensor]],
    spill: Spill,
    kind: str,
    into: SpilledGrams | None = None,
) -> SpilledGrams:
    """Move ``grams`` onto ``spill`` (adding to ``into`` when given). A dict is consumed (each entry
    dropped once written; keys whose Grams are the same tensor object are stored once); an iterator
    of ``(key, Gram)`` is read one Gram at a time."""
    out = into if into is not None else SpilledGrams(spill, kind)
    for keys, gram in _distinct(grams):
        out.put(keys, gram)
        del gram
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
