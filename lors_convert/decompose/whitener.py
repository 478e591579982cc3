"""Whiteners: the square root of a calibration Gram, kept in its eigenbasis, and its eigendecomposition.

A Gram ``C = E[x x^T]`` (``(n, n)``, symmetric PSD) is decomposed once, ``C = Q diag(lam) Q^T``
(:func:`gram_eigh`; cached per Gram object by :func:`cached_eigh`, or read from disk when the
calibration keeps it there), its eigenvalues floored at ``floor * max(lam)`` and damped by
``damp * mean(lam)``: the effective Gram ``C' = Q diag(lam') Q^T`` and its square root
``L = Q diag(lam')^{1/2}`` (:class:`Whitener`). The weighted LORS math (:mod:`.whiten`) applies
``L``, ``L^-1`` and ``C'`` through ``Q`` and never forms them. No I/O.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .topk import serial

DEFAULT_FLOOR = 1e-6  # eigenvalue floor, relative to the largest eigenvalue
EXACT_DAMP = 0.0  # no ridge: the math weighs by the Gram as measured (a conversion adds its own)


@dataclass
class Whitener:
    """One effective Gram ``C' = Q diag(lam) Q^T`` (floored, damped) kept in its eigenbasis, and the
    square root it defines: ``L = Q diag(lam)^{1/2}`` (``L L^T = C'``), ``L^-1 = diag(lam)^{-1/2} Q^T``.

    Only ``Q`` and the eigenvalues are held, never an ``n x n`` product: ``Q`` is the cached
    eigendecomposition's own tensor (read, never written), ``None`` the identity basis. The methods
    apply ``L``, ``L^-1`` from either side; ``gram()``, ``L`` and ``L_inv`` form dense matrices
    (``gram()`` for the shared-part solves, the other two for tests). A float32 ``Q`` (Grams kept
    on disk, :mod:`lors_convert.calibrate.spilled`) is widened for ``L`` and ``L^-1`` and used as
    is by :meth:`times` (the shared-part solve's products, half the work).
    """

    Q: torch.Tensor | None  # (n, n) orthogonal, or None: the identity
    lam: torch.Tensor  # (n,) effective eigenvalues, all > 0

    @property
    def root(self) -> torch.Tensor:
        return self.lam.sqrt()  # (n,)

    def _q(self, X: torch.Tensor) -> torch.Tensor:
        return self.Q if self.Q.dtype == X.dtype else self.Q.to(X.dtype)

    def right_L(self, R: torch.Tensor) -> torch.Tensor:
        """``R L`` for ``R`` (m, n)."""
        return (R if self.Q is None else R @ self._q(R)) * self.root

    def left_LT(self, Z: torch.Tensor) -> torch.Tensor:
        """``L^T Z`` for ``Z`` (n, m)."""
        return self.root[:, None] * (Z if self.Q is None else self._q(Z).T @ Z)

    def right_L_inv(self, A: torch.Tensor) -> torch.Tensor:
        """``A L^-1`` for ``A`` (k, n)."""
        A = A / self.root
        return A if self.Q is None else A @ self._q(A).T

    def left_L_inv_T(self, B: torch.Tensor) -> torch.Tensor:
        """``L^-T B`` for ``B`` (n, k)."""
        B = B / self.root[:, None]
        return B if self.Q is None else self._q(B) @ B

    def times(self, X: torch.Tensor) -> torch.Tensor:
        """``C' X`` for ``X`` (n, m), through the eigenbasis (no dense ``C'``), in ``Q``'s precision."""
        if self.Q is None:
            return self.lam[:, None] * X
        Q, lam = self.Q, self.lam.to(self.Q.dtype)
        return (Q @ (lam[:, None] * (Q.T @ X.to(Q.dtype)))).to(X.dtype)

    def times_right(self, X: torch.Tensor) -> torch.Tensor:
        """``X C'`` for ``X`` (m, n), in ``Q``'s precision."""
        if self.Q is None:
            return X * self.lam
        Q, lam = self.Q, self.lam.to(self.Q.dtype)
        return (((X.to(Q.dtype) @ Q) * lam) @ Q.T).to(X.dtype)

    def gram(self, plus: torch.Tensor | None = None) -> torch.Tensor:
        """``C'`` as a dense (n, n) matrix in the eigenvalues' precision; with ``plus``, ``plus + C'``
        added into ``plus`` in place. ``C' = S S^T`` with ``S = Q diag(lam)^{1/2}``: a sum of a
        stack's Grams holds itself and one ``n x n`` copy of ``Q``."""
        if self.Q is None:
            if plus is None:
                return torch.diag(self.lam)
            plus.diagonal().add_(self.lam)
            return plus
        S = self.Q.to(self.lam.dtype, copy=True).mul_(self.root)  # (n, n)
        return S @ S.T if plus is None else plus.addmm_(S, S.T)

    @property
    def L(self) -> torch.Tensor:
        return self.right_L(torch.eye(self.lam.shape[0], dtype=self.lam.dtype, device=self.lam.device))

    @property
    def L_inv(self) -> torch.Tensor:
        return self.right_L_inv(torch.eye(self.lam.shape[0], dtype=self.lam.dtype, device=self.lam.device))


def identity_whitener(n: int, device=None) -> Whitener:
    """The plain Frobenius error: ``L = C' = I``."""
    return Whitener(Q=None, lam=torch.ones(n, dtype=torch.float64, device=device))


def gram_eigh(C: torch.Tensor, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """``C = Q diag(lam) Q^T`` in ``dtype`` with ``lam >= 0``; diagonal Grams skip the eigensolver."""
    C = C.to(dtype)
    diag = torch.diagonal(C)
    if torch.count_nonzero(C) == torch.count_nonzero(diag):  # no off-diagonal entry, no n x n temporary
        return diag.clamp_min(0.0), torch.eye(C.shape[0], dtype=dtype, device=C.device)
    with serial():  # LAPACK on one thread (see decompose.topk.serial)
        lam, Q = torch.linalg.eigh(C)  # reads the lower triangle: no symmetrized copy beside Q
    return lam.clamp_min(0.0), Q


def whitener(
    C: torch.Tensor | None = None,
    floor: float = DEFAULT_FLOOR,
    damp: float = EXACT_DAMP,
    eig: tuple[torch.Tensor, torch.Tensor] | None = None,
    scale: float = 1.0,
) -> Whitener:
    """Eigendecomposition square root of a symmetric PSD Gram matrix with an eigenvalue floor.

    ``floor`` is relative to the largest eigenvalue, ``damp`` adds ``damp * mean eigenvalue`` to all
    (both scale-free). ``eig``: a precomputed :func:`gram_eigh` of ``C`` (then ``C`` may be None),
    ``scale``: multiplies the Gram. An all-zero Gram (a layer never reached) falls back to the
    identity (plain Frobenius error).
    """
    lam, Q = eig if eig is not None else gram_eigh(C)
    lam = lam * scale
    n = lam.shape[0]
    top = float(lam.max()) if n else 0.0
    if top <= 0.0 or not math.isfinite(top):
        return identity_whitener(n, lam.device)
    lam = lam + damp * float(lam.mean())
    lam = lam.clamp_min(floor * float(lam.max()))
    return Whitener(Q=Q, lam=lam)


class Whiteners(Sequence):
    """A stack's whiteners, one per layer; those of Grams read from disk (``ScaledGram.eig`` a
    callable) are built each time they are used, so a stack's eigenbases are never all in memory."""

    def __init__(self, items: list, floor: float, damp: float, device):
        self.items, self.floor, self.damp, self.device = items, floor, damp, device

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Whitener:
        item = self.items[i]
        if isinstance(item, Whitener):
            return item
        lam, Q = item.eig()
        return whitener(
            eig=(lam.to(self.device), Q.to(self.device)), scale=item.scale, floor=self.floor, damp=self.damp
        )


def stack_whiteners(grams, count: int, n: int, floor, damp, device) -> Whiteners:
    """One whitener per layer of a stack (identity where a Gram is None), see :class:`Whiteners`."""
    if grams is None:
        grams = [None] * count
    wh = []
    for C in grams:
        if C is None:
            wh.append(identity_whitener(n, device))
        elif isinstance(C, ScaledGram) and callable(C.eig):
            if C.size != n:
                raise ValueError(f"Gram of size {C.size} does not match the matrix side {n}")
            wh.append(C)  # read when used
        elif isinstance(C, ScaledGram):
            lam, Q = C.eig if C.eig is not None else cached_eigh(C.gram)
            if lam.shape[0] != n:
                raise ValueError(f"Gram of size {lam.shape[0]} does not match the matrix side {n}")
            wh.append(whitener(eig=(lam.to(device), Q.to(device)), scale=C.scale, floor=floor, damp=damp))
        else:
            if tuple(C.shape) != (n, n):
                raise ValueError(f"Gram of shape {tuple(C.shape)} does not match the matrix side {n}")
            wh.append(whitener(C.to(device), floor=floor, damp=damp))
    return Whiteners(wh, floor, damp, device)


@dataclass
class ScaledGram:
    """``scale * gram`` without copying: the eigendecomposition of ``gram`` is computed once and cached,
    or given (``eig``, then ``gram`` may be None): ``(lam, Q)``, or a function reading them (from
    disk) each time a whitener is built, with ``size`` the Gram's side."""

    gram: torch.Tensor | None
    scale: float = 1.0
    eig: tuple[torch.Tensor, torch.Tensor] | Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None
    size: int | None = None  # with a callable eig


_EIG_CACHE: dict[int, tuple[weakref.ref, tuple[torch.Tensor, torch.Tensor]]] = {}


def cached_eigh(C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`gram_eigh` cached per Gram tensor object (q/k/v share one; budget and decomposition reuse it).

    An entry lives as long as its Gram: it is dropped when the Gram is freed (a calibration let go
    of does not keep its eigenbases, as large as its Grams, alive).
    """
    key = id(C)
    entry = _EIG_CACHE.get(key)
    if entry is not None and entry[0]() is C:
        return entry[1]
    eig = gram_eigh(C)

    def forget(ref, key=key):
        if _EIG_CACHE.get(key, (None,))[0] is ref:  # not a newer Gram that reuses the id
            del _EIG_CACHE[key]

    _EIG_CACHE[key] = (weakref.ref(C, forget), eig)
    return eig


__all__ = [
    "EXACT_DAMP",
    "DEFAULT_FLOOR",
    "ScaledGram",
    "Whitener",
    "Whiteners",
    "cached_eigh",
    "gram_eigh",
    "identity_whitener",
    "stack_whiteners",
    "whitener",
]
