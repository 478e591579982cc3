"""Whiteners: a square root of a calibration Gram, and the effective Gram it belongs to.

A Gram ``C = E[x x^T]`` (``(n, n)``, symmetric PSD) enters the weighted LORS math (:mod:`.whiten`)
through its *effective* Gram ``C'``, floored and damped: eigenvalues raised to at least
``floor * max(lam)`` after a ridge of ``damp * mean(lam)``, and a square root ``L L^T = C'``. Two
representations, one interface (:class:`Whitener`):

- :class:`CholeskyWhitener`: ``C' = C + damp * mean(lam) I`` and its Cholesky factor. Whenever
  ``damp >= floor * n / (1 - floor)`` the floor cannot bind (every eigenvalue of ``C'`` is at least
  the ridge, and the ridge is at least ``floor`` times the largest), so this is the same ``C'``; a
  conversion's ridge (``CONVERSION_DAMP``) always qualifies. A Cholesky factorization costs
  ``n^3 / 3``, several times less than an eigendecomposition, and ``C'`` is applied as one product.
- :class:`EigenWhitener`: ``C = Q diag(lam) Q^T`` (:func:`gram_eigh`, cached per Gram object by
  :func:`cached_eigh`), ``C' = Q diag(lam') Q^T``, ``L = Q diag(lam')^{1/2}``: any floor.

Every square root of ``C'`` is ``L Q`` for an orthogonal ``Q``, so the whitened spectra, the
truncations and the errors do not depend on which one is used. No I/O.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import LorsError
from .topk import lapack_threads
from .triangular import lower_right, lower_t_left

DEFAULT_FLOOR = 1e-6  # eigenvalue floor, relative to the largest eigenvalue
EXACT_DAMP = 0.0  # no ridge: the math weighs by the Gram as measured (a conversion adds its own)


class Whitener:
    """A square root ``L`` of an effective Gram ``C'`` (``L L^T = C'``), applied from either side,
    never formed (see the module docstring)."""

    def right_L(self, R: torch.Tensor) -> torch.Tensor:  # R L, R (m, n)
        raise NotImplementedError

    def left_LT(self, Z: torch.Tensor) -> torch.Tensor:  # L^T Z, Z (n, m)
        raise NotImplementedError

    def right_L_inv(self, A: torch.Tensor) -> torch.Tensor:  # A L^-1, A (k, n)
        raise NotImplementedError

    def left_L_inv_T(self, B: torch.Tensor) -> torch.Tensor:  # L^-T B, B (n, k)
        raise NotImplementedError

    def right_L_inv_T(self, X: torch.Tensor) -> torch.Tensor:  # X L^-T = X C'^-1 L, X (m, n)
        raise NotImplementedError

    def times(self, X: torch.Tensor) -> torch.Tensor:  # C' X, X (n, m)
        raise NotImplementedError

    def times_right(self, X: torch.Tensor) -> torch.Tensor:  # X C', X (m, n)
        raise NotImplementedError

    def solve_right(self, X: torch.Tensor) -> torch.Tensor:  # X C'^-1, X (m, n)
        raise NotImplementedError

    def gram(self, plus: torch.Tensor | None = None, weight: float = 1.0) -> torch.Tensor:
        """``weight * C'`` as a dense (n, n) matrix; with ``plus``, added into ``plus`` in place."""
        raise NotImplementedError

    @property
    def precision(self) -> torch.dtype:
        """The dtype the Gram was given in (float32 for Grams kept on disk): products that only
        need the Gram's own accuracy are made in it."""
        raise NotImplementedError

    @property
    def L(self) -> torch.Tensor:
        return self.right_L(torch.eye(self.size, dtype=torch.float64, device=self.device))

    @property
    def L_inv(self) -> torch.Tensor:
        return self.right_L_inv(torch.eye(self.size, dtype=torch.float64, device=self.device))


@dataclass
class EigenWhitener(Whitener):
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

    def right_L_inv_T(self, X: torch.Tensor) -> torch.Tensor:
        """``X L^-T`` for ``X`` (m, n): ``X Q diag(lam)^{-1/2}``."""
        return (X if self.Q is None else X @ self._q(X)) / self.root

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

    def solve_right(self, X: torch.Tensor) -> torch.Tensor:
        """``X C'^-1`` for ``X`` (m, n), through the eigenbasis."""
        if self.Q is None:
            return X / self.lam
        Q = self._q(X)
        return ((X @ Q) / self.lam.to(X.dtype)) @ Q.T  # (m, n)

    def gram(self, plus: torch.Tensor | None = None, weight: float = 1.0) -> torch.Tensor:
        """``weight * C'`` as a dense (n, n) matrix in the eigenvalues' precision; with ``plus``,
        ``plus + weight * C'`` added into ``plus`` in place. ``C' = S S^T`` with ``S = Q diag(lam)^{1/2}``:
        a sum of a stack's Grams holds itself and one ``n x n`` copy of ``Q``."""
        if self.Q is None:
            if plus is None:
                return torch.diag(self.lam * weight)
            plus.diagonal().add_(self.lam, alpha=weight)
            return plus
        S = self.Q.to(self.lam.dtype, copy=True).mul_(self.root)  # (n, n)
        if plus is None:
            return (S @ S.T).mul_(weight) if weight != 1.0 else S @ S.T
        return plus.addmm_(S, S.T, alpha=weight)

    @property
    def precision(self) -> torch.dtype:
        return self.lam.dtype if self.Q is None else self.Q.dtype

    @property
    def size(self) -> int:
        return self.lam.shape[0]

    @property
    def device(self) -> torch.device:
        return self.lam.device


@dataclass
class CholeskyWhitener(Whitener):
    """``C' = scale * (C + ridge I)``, ``ridge = damp * tr(C) / n``, with ``L = scale^{1/2} L0``,
    ``L0 L0^T = C + ridge I``, ``L0`` lower triangular. ``C`` is the Gram as given (read, never written
    or copied) and is what :meth:`times` multiplies by, in its own precision (float32 for Grams kept
    on disk). ``L0`` is factored when a root is first applied (:func:`cached_cholesky`: once per Gram
    object), so the shared-part solves, which only multiply by ``C'``, never factor; it is widened to
    the operand's precision for the root's products and solves."""

    C: torch.Tensor  # (n, n) symmetric PSD
    damp: float
    ridge: float  # damp * tr(C) / n, added to the diagonal of C
    scale: float = 1.0
    factor: Callable[[], torch.Tensor] | None = None  # reads L0; default: cached

    @property
    def L0(self) -> torch.Tensor:
        return cached_cholesky(self.C, self.damp) if self.factor is None else self.factor()

    def _l(self, X: torch.Tensor) -> torch.Tensor:
        L0 = self.L0
        return L0 if L0.dtype == X.dtype else L0.to(X.dtype)

    def right_L(self, R: torch.Tensor) -> torch.Tensor:
        return lower_right(R, self._l(R)).mul_(math.sqrt(self.scale))

    def left_LT(self, Z: torch.Tensor) -> torch.Tensor:
        return lower_t_left(self._l(Z), Z).mul_(math.sqrt(self.scale))

    def right_L_inv(self, A: torch.Tensor) -> torch.Tensor:
        X = torch.linalg.solve_triangular(self._l(A), A, upper=False, left=False)  # X L0 = A
        return X.div_(math.sqrt(self.scale))

    def left_L_inv_T(self, B: torch.Tensor) -> torch.Tensor:
        X = torch.linalg.solve_triangular(self._l(B).T, B, upper=True)  # L0^T X = B
        return X.div_(math.sqrt(self.scale))

    def right_L_inv_T(self, X: torch.Tensor) -> torch.Tensor:
        Y = torch.linalg.solve_triangular(self._l(X).T, X, upper=True, left=False)  # Y L0^T = X
        return Y.div_(math.sqrt(self.scale))

    def times(self, X: torch.Tensor) -> torch.Tensor:
        Y = X.to(self.C.dtype)
        return torch.addmm(Y, self.C, Y, beta=self.ridge, alpha=1.0).mul_(self.scale).to(X.dtype)

    def times_right(self, X: torch.Tensor) -> torch.Tensor:
        Y = X.to(self.C.dtype)
        return torch.addmm(Y, Y, self.C, beta=self.ridge, alpha=1.0).mul_(self.scale).to(X.dtype)

    def solve_right(self, X: torch.Tensor) -> torch.Tensor:
        """``X C'^-1`` for ``X`` (m, n): two triangular solves."""
        return torch.cholesky_solve(X.T, self._l(X)).T.div_(self.scale)

    def gram(self, plus: torch.Tensor | None = None, weight: float = 1.0) -> torch.Tensor:
        w = weight * self.scale
        if plus is None:
            plus = torch.zeros(self.C.shape, dtype=torch.float64, device=self.C.device)
        plus.add_(self.C, alpha=w)
        plus.diagonal().add_(w * self.ridge)
        return plus

    @property
    def precision(self) -> torch.dtype:
        return self.C.dtype

    @property
    def size(self) -> int:
        return self.C.shape[0]

    @property
    def device(self) -> torch.device:
        return self.C.device


def common_precision(*items: Whitener | torch.Tensor | None) -> torch.dtype:
    """The dtype that work on these Grams (whiteners or dense tensors; None is skipped) needs: the
    widest of their precisions, float32 only when every one is float32."""
    dtypes = [i.precision if isinstance(i, Whitener) else i.dtype for i in items if i is not None]
    return functools.reduce(torch.promote_types, dtypes)


def identity_whitener(n: int, device=None) -> EigenWhitener:
    """The plain Frobenius error: ``L = C' = I``."""
    return EigenWhitener(Q=None, lam=torch.ones(n, dtype=torch.float64, device=device))


def gram_eigh(C: torch.Tensor, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """``C = Q diag(lam) Q^T`` in ``dtype`` with ``lam >= 0``; diagonal Grams skip the eigensolver."""
    C = C.to(dtype)
    diag = torch.diagonal(C)
    if torch.count_nonzero(C) == torch.count_nonzero(diag):  # no off-diagonal entry, no n x n temporary
        return diag.clamp_min(0.0), torch.eye(C.shape[0], dtype=dtype, device=C.device)
    with lapack_threads():  # one thread on a shared machine (decompose.topk)
        lam, Q = torch.linalg.eigh(C)  # reads the lower triangle: no symmetrized copy beside Q
    return lam.clamp_min(0.0), Q


def cholesky_qualifies(n: int, floor: float, damp: float) -> bool:
    """Whether the floor cannot bind after the ridge, so that ``C' = C + damp * mean(lam) I``: every
    eigenvalue of ``C'`` is at least the ridge, the largest at most ``n * mean + ridge``."""
    return damp > 0.0 and damp * (1.0 - floor) >= floor * n


def gram_cholesky(C: torch.Tensor, damp: float) -> torch.Tensor:
    """``L0`` (n, n) lower triangular with ``L0 L0^T = C + ridge I``, ``ridge = damp * tr(C) / n`` (> 0),
    in ``C``'s precision."""
    ridge = damp * _mean_diagonal(C)
    shifted = C.clone()
    shifted.diagonal().add_(ridge)
    with lapack_threads():
        L0, info = torch.linalg.cholesky_ex(shifted)  # (n, n) lower
    if int(info) != 0:
        raise LorsError(f"a calibration Gram of side {C.shape[0]} is not positive semidefinite")
    return L0


def _mean_diagonal(C: torch.Tensor) -> float:
    """``tr(C) / n``, the mean eigenvalue."""
    return float(C.diagonal().sum(dtype=torch.float64)) / C.shape[0] if C.shape[0] else 0.0


def whitener(
    C: torch.Tensor | None = None,
    floor: float = DEFAULT_FLOOR,
    damp: float = EXACT_DAMP,
    eig: tuple[torch.Tensor, torch.Tensor] | None = None,
    scale: float = 1.0,
    factor: Callable[[], torch.Tensor] | None = None,
) -> Whitener:
    """A square root of a symmetric PSD Gram matrix, floored and damped.

    ``floor`` is relative to the largest eigenvalue, ``damp`` adds ``damp * mean eigenvalue`` to all
    (both scale-free). ``eig``: a precomputed :func:`gram_eigh` of ``C`` (then ``C`` may be None),
    ``scale``: multiplies the Gram. A :class:`CholeskyWhitener` when the floor cannot bind
    (:func:`cholesky_qualifies`) and ``C`` is given (``factor``: where its factor is read, default
    :func:`cached_cholesky`), else an :class:`EigenWhitener`. An all-zero Gram
    (a layer never reached) falls back to the identity (plain Frobenius error).
    """
    if eig is None and cholesky_qualifies(C.shape[0], floor, damp):
        mean = _mean_diagonal(C)
        if mean * scale <= 0.0 or not math.isfinite(mean * scale):
            return identity_whitener(C.shape[0], C.device)
        return CholeskyWhitener(C=C, damp=damp, ridge=damp * mean, scale=scale, factor=factor)
    lam, Q = eig if eig is not None else cached_eigh(C)
    lam = lam * scale
    n = lam.shape[0]
    top = float(lam.max()) if n else 0.0
    if top <= 0.0 or not math.isfinite(top):
        return identity_whitener(n, lam.device)
    lam = lam + damp * float(lam.mean())
    lam = lam.clamp_min(floor * float(lam.max()))
    return EigenWhitener(Q=Q, lam=lam)


class Whiteners(Sequence):
    """A stack's whiteners, one per layer; those of Grams read from disk (``ScaledGram.load``) are
    built each time they are used, so a stack's square roots are never all in memory."""

    def __init__(self, items: list, floor: float, damp: float, device):
        self.items, self.floor, self.damp, self.device = items, floor, damp, device

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Whitener:
        item = self.items[i]
        if isinstance(item, Whitener):
            return item
        C = item.load().to(self.device)
        factor = None if item.factor is None else functools.partial(item.factor, self.damp)
        return whitener(C, scale=item.scale, floor=self.floor, damp=self.damp, factor=factor)


def stack_whiteners(grams, count: int, n: int, floor, damp, device) -> Whiteners:
    """One whitener per layer of a stack (identity where a Gram is None), see :class:`Whiteners`."""
    if grams is None:
        grams = [None] * count
    wh = []
    for C in grams:
        if C is None:
            wh.append(identity_whitener(n, device))
        elif isinstance(C, ScaledGram) and C.load is not None:
            if C.size != n:
                raise ValueError(f"Gram of size {C.size} does not match the matrix side {n}")
            wh.append(C)  # read when used
        else:
            gram, scale = (C.gram, C.scale) if isinstance(C, ScaledGram) else (C, 1.0)
            if tuple(gram.shape) != (n, n):
                raise ValueError(f"Gram of shape {tuple(gram.shape)} does not match the matrix side {n}")
            wh.append(whitener(gram.to(device), scale=scale, floor=floor, damp=damp))
    return Whiteners(wh, floor, damp, device)


@dataclass
class ScaledGram:
    """``scale * gram`` without copying (its square root is computed once per Gram object and cached),
    or ``load``, a function reading the Gram (from disk) each time a whitener is built, with ``size``
    the Gram's side (then ``gram`` is None) and ``factor``, one reading the Gram's Cholesky factor
    (:func:`gram_cholesky`) kept beside it."""

    gram: torch.Tensor | None
    scale: float = 1.0
    load: Callable[[], torch.Tensor] | None = None
    size: int | None = None  # with load
    factor: Callable[[float], torch.Tensor] | None = None  # with load: damp -> L0


_CACHE: dict[tuple[int, str, float], tuple[weakref.ref, object]] = {}


def _cached(C: torch.Tensor, kind: str, param: float, compute: Callable[[], object]):
    """``compute()`` cached per Gram tensor object (q/k/v share one; budget and decomposition reuse it).

    An entry lives as long as its Gram: it is dropped when the Gram is freed (a calibration let go
    of does not keep its square roots, as large as its Grams, alive).
    """
    key = (id(C), kind, param)
    entry = _CACHE.get(key)
    if entry is not None and entry[0]() is C:
        return entry[1]
    value = compute()

    def forget(ref, key=key):
        if _CACHE.get(key, (None,))[0] is ref:  # not a newer Gram that reuses the id
            del _CACHE[key]

    _CACHE[key] = (weakref.ref(C, forget), value)
    return value


def cached_eigh(C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`gram_eigh` of ``C``, cached per Gram object (:func:`_cached`)."""
    return _cached(C, "eigh", 0.0, lambda: gram_eigh(C))


def cached_cholesky(C: torch.Tensor, damp: float) -> torch.Tensor:
    """:func:`gram_cholesky` of ``C``, cached per Gram object and ridge (:func:`_cached`)."""
    return _cached(C, "cholesky", damp, lambda: gram_cholesky(C, damp))


__all__ = [
    "EXACT_DAMP",
    "DEFAULT_FLOOR",
    "CholeskyWhitener",
    "EigenWhitener",
    "ScaledGram",
    "Whitener",
    "Whiteners",
    "cached_cholesky",
    "cached_eigh",
    "cholesky_qualifies",
    "common_precision",
    "gram_cholesky",
    "gram_eigh",
    "identity_whitener",
    "stack_whiteners",
    "whitener",
]
