"""Top-``k`` singular triplets of one matrix or a batch ``(..., d, h)``, by the cheapest accurate route.

Every route works on the short side: ``X = R`` if ``d <= h`` else ``X = R^T``, ``X`` is ``(m, n)`` with
``m = min(d, h)``. It finds an orthonormal basis ``U_k`` (m, k) of (an approximation of) the top-k
left singular subspace of ``X`` and projects onto it::

    P = U_k^T X = S_k V_k^T  (k, n),   S_k = row norms of P,   U_k P = U_k U_k^T X

so the factors are always an orthogonal projection of ``X`` onto the basis found, whatever its
accuracy: the error of the factors is at least the Eckart-Young optimum and exactly that when the
basis is the top-k singular subspace. Routes, with their multiply-add cost for ``q = k + OVERSAMPLE``:

- ``"svd"``: LAPACK's ``torch.linalg.svd``, exact; about ``20 m^2 n`` and slow per flop.
- ``"eigh"``: eigenvectors of the Gram ``G = X X^T`` (m, m), whose eigenvalues are ``sigma^2``; top k
  by value. ``m^2 n`` for ``G`` plus ``~10 m^3`` for the eigensolver. Exact up to rounding: the
  Gram squares the condition number, so directions below ``sqrt(eps) sigma_1`` are resolved
  poorly, but they are the discarded ones (or, at full rank, all are kept and ``U U^T = I``).
- ``"gram"``: subspace iteration on ``G`` (``GRAM_ITERS`` products ``G Q``, QR each time) and a
  Rayleigh-Ritz step, ``Q^T G Q`` (q, q) eigen-decomposed: ``m^2 n + GRAM_ITERS m^2 q``. Randomized
  (seeded start); each product with ``G`` is one power iteration of the range finder below.
- ``"range"``: the randomized range finder on ``X`` itself (Halko, Martinsson, Tropp 2011, alg. 4.4):
  ``Q = orth(X Omega)``, ``RANGE_NITER`` power iterations ``Q = orth(X orth(X^T Q))``, then the
  Rayleigh-Ritz step on ``P = Q^T X``: ``(2 RANGE_NITER + 2) q m n``; the only route that never
  forms an ``m x m`` matrix, the cheapest for small ``k``.

``method="auto"`` takes ``"range"`` where its products cost at most half of forming the Gram,
``"gram"`` where ``q`` is a small part of ``m``, and ``"eigh"`` elsewhere; ``"randomized"`` takes the cheaper randomized
route; ``"exact"`` is ``"svd"``. :func:`gram_svd` is the ``"eigh"`` route with every singular value kept, for
the calibrated fits' float64 whitened residuals. Random starts are drawn from a generator seeded with 0, one matrix
shared by the batch, so results are reproducible and do not depend on how layers are batched.

LAPACK factorizations (QR, eigh, Cholesky, SVD) run inside :func:`lapack_threads`: on a machine whose
cores are shared (OpenMP threads that sleep at barriers, ``OMP_WAIT_POLICY=PASSIVE``, which ``lors``
sets when other work is runnable as it starts: :mod:`lors_convert.threads`) on one thread, since a
blocked factorization is a long series of small parallel regions, each ending in a barrier that waits
for a descheduled thread (README, Benchmarks); alone on every thread (docs/benchmarks.md: 1.6-2x at
sides 1,536 to 5,632 on 2 cores). The large matrix products around them keep torch's thread count.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

OVERSAMPLE = 16  # extra columns of the random start: q = k + OVERSAMPLE
RANGE_NITER = 4  # power iterations of the range finder on X
GRAM_ITERS = 8  # products with the Gram in subspace iteration (= power iterations on X, at m^2 q each)
GRAM_MAX_FRACTION = 0.25  # subspace iteration only while q <= this fraction of m; eigh beyond


def route(m: int, n: int, k: int, method: str = "auto") -> str:
    """Which route computes the top ``k`` of an ``(m, n)`` short-side matrix (``m <= n``)."""
    if method == "exact":
        return "svd"
    q = k + OVERSAMPLE
    if q >= m:  # nothing to gain from a random subspace as large as the space
        return "eigh"
    # (2 niter + 2) q m n for the range finder's products vs m^2 n for the Gram: below half, the
    # range finder is faster; above, the Gram route costs about the same and lands closer to the
    # optimum (tests/test_decompose.py prints both)
    if (2 * RANGE_NITER + 2) * q <= m // 2:
        return "range"
    if method == "randomized":
        return "gram"
    return "gram" if q <= GRAM_MAX_FRACTION * m else "eigh"


@contextmanager
def serial():
    """Run torch's CPU kernels on one thread inside the block (restores the count after)."""
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


def shared_machine() -> bool:
    """Whether OpenMP threads sleep at barriers (``OMP_WAIT_POLICY=PASSIVE``): the sign of a machine
    shared with other work (module docstring)."""
    return os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"


@contextmanager
def lapack_threads():
    """Run a LAPACK factorization on one thread on a shared machine, on torch's threads alone."""
    if shared_machine():
        with serial():
            yield
    else:
        yield


def _orth(Y: torch.Tensor) -> torch.Tensor:
    with lapack_threads():
        return torch.linalg.qr(Y).Q  # (..., rows, q)


def _eigh(T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors (columns in that order) of the symmetric ``T`` (..., s, s)."""
    with lapack_threads():
        return torch.linalg.eigh(T)


def _start(rows: int, q: int, like: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator(device=like.device).manual_seed(0)
    return torch.randn(rows, q, generator=gen, device=like.device, dtype=like.dtype)  # (rows, q)


def _ritz(Q: torch.Tensor, T: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k eigenvectors of the symmetric ``T`` (..., q, q) mapped through ``Q`` (..., m, q)."""
    return Q @ _eigh(T)[1][..., -k:].flip(-1)  # (..., m, k)


def top_basis(X: torch.Tensor, k: int, how: str) -> torch.Tensor:
    """Orthonormal ``U_k`` (..., m, k) of the top-k left singular subspace of ``X`` (..., m, n), m <= n."""
    if how == "svd":
        with lapack_threads():
            return torch.linalg.svd(X, full_matrices=False)[0][..., :k]  # (..., m, k)
    m = X.shape[-2]
    q = k + OVERSAMPLE
    if how == "range":
        Q = _orth(X @ _start(X.shape[-1], q, X))  # (..., m, q)
        for _ in range(RANGE_NITER):
            Q = _orth(X @ _orth(X.mT @ Q))  # (..., n, q) -> (..., m, q)
        P = Q.mT @ X  # (..., q, n)
        return _ritz(Q, P @ P.mT, k)
    G = X @ X.mT  # (..., m, m)
    if how == "eigh":
        return _eigh(G)[1][..., -k:].flip(-1)  # (..., m, k)
    if how == "gram":
        Q = _orth(G @ _start(m, q, X))  # (..., m, q)
        for _ in range(GRAM_ITERS - 1):
            Q = _orth(G @ Q)
        return _ritz(Q, Q.mT @ G @ Q, k)
    raise ValueError(f"unknown route {how!r}")


def _projected(U: torch.Tensor, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``S (..., k)``, ``V^T (..., k, n)`` with ``diag(S) V^T = U^T X``, the projection of ``X`` onto
    the orthonormal ``U`` (..., m, k); a zero row of ``U^T X`` stays zero."""
    P = U.mT @ X  # (..., k, n)
    S = torch.linalg.vector_norm(P, dim=-1)  # (..., k)
    return S, P / torch.where(S > 0, S, torch.ones_like(S)).unsqueeze(-1)


def gram_svd(R: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-``k`` singular vectors and every singular value of ``R`` (d, h), from the eigenpairs
    of the short side's Gram: ``U (d, k)``, ``S (m,)`` descending, ``Vh (k, h)``, ``m = min(d, h)``.

    With ``X`` the short side (m, n) and ``X X^T = Q diag(lam) Q^T``, ``U_k`` is the top-``k`` columns
    of ``Q`` and, as in :func:`top_singular`, ``P = U_k^T X = S_k V_k^T`` gives the leading values as
    row norms (``U_k diag(S_k) V_k^T`` is the projection of ``X`` onto ``U_k``); the rest of ``S`` is
    ``sqrt(lam)``. Exact up to rounding where the discarded directions lie below ``sqrt(eps) sigma_1``
    (the ``"eigh"`` route): one ``m^2 n`` product and one ``m x m`` eigensolve, no SVD with vectors
    (docs/benchmarks.md measures both). The vectors of a value ``sigma_j`` are accurate to about
    ``eps (sigma_1 / sigma_j)^2``: enough in float64, where the calibrated fits use it."""
    d, h = R.shape
    transposed = d > h
    X = R.mT if transposed else R  # (m, n), a view
    lam, Q = _eigh(X @ X.mT)  # (m,), (m, m) ascending
    S = lam.clamp_min(0).sqrt().flip(0)  # (m,) descending
    k = min(k, X.shape[0])
    U = Q[:, X.shape[0] - k :].flip(-1)  # (m, k)
    S[:k], V = _projected(U, X)  # (k,), (k, n)
    if transposed:  # R = X^T = V^T S U^T
        return V.mT, S, U.mT
    return U, S, V


def top_singular(
    R: torch.Tensor, k: int, method: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U (..., d, k), S (..., k), Vh (..., k, h)`` with ``U diag(S) Vh`` the projection of ``R``
    onto the top-k subspace found (module docstring). ``S`` is descending up to the route's
    accuracy; a zero singular value gets a zero column/row in place of an arbitrary unit vector."""
    d, h = R.shape[-2:]
    transposed = d > h
    X = R.mT if transposed else R  # (..., m, n), a view
    m, n = X.shape[-2:]
    U = top_basis(X, k, route(m, n, k, method))  # (..., m, k)
    S, V = _projected(U, X)  # (..., k), (..., k, n)
    if transposed:  # R = X^T = V^T S U^T
        return V.mT, S, U.mT
    return U, S, V
