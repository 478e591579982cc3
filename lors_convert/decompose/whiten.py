"""Activation-aware (whitened) LORS math: weighted shared part, whitened truncated SVD, refinement.

Pure functions, no model. For one stacked parameter with layer matrices ``W_i`` in *linear
orientation* ``(out, in)`` (``y = W x``), input Gram matrices ``C_i = E[x x^T]`` ``(in, in)`` and,
optionally, output-side Grams ``G_i`` ``(out, out)`` (the model output's sensitivity to the layer's
output, :mod:`lors_convert.calibrate.sensitivity`; identity when absent), the error a layer's approximation makes is

    E_i = tr(G_i D_i C_i D_i^T) = ||M_i^T D_i L_i||_F^2,   D_i = W_i - What_i,  L_i L_i^T = C_i,  M_i M_i^T = G_i.

With ``G_i = I`` this is the layer's own output error on its calibration inputs; with the output
Grams it is the model output's error to first order (K-FAC).

- Shared part (weighted least squares over the stack, private parts fixed at ``P_i``)::

      sum_i G_i W_s C_i = sum_i G_i (W_i - P_i) C_i        (P_i = 0 at initialization)

  closed form ``W_s = (sum_i (W_i - P_i) C_i) (sum_i C_i)^-1`` without output Grams; with them,
  preconditioned conjugate gradients (preconditioner: the Kronecker product of the mean Grams),
  started from the current shared part, so a refinement sweep never increases the error.
- Private part of rank ``k_i``: truncated SVD of the whitened residual ``M_i^T (W_i - W_s) L_i = U S V^T``,
  mapped back, ``B_i = M_i^-T U_k S_k^{1/2}``, ``A_i = S_k^{1/2} V_k^T L_i^{-1}``. By Eckart-Young this is
  the best rank-``k_i`` private part for the weighted error, and ``E_i`` equals the discarded
  whitened energy ``sum_{j>k} s_j^2``.
- Refinement alternates the two minimizations, so the total weighted error never increases.

``L_i`` (and ``M_i``) are square roots of the effective Gram ``C'``: ``C``'s eigenvalues plus an
optional ridge ``damp * mean(lam)``, floored at ``floor * max`` (a singular Gram, e.g. from few tokens or
dead inputs, stays invertible); a Cholesky factor when the ridge keeps the floor from binding, else
``Q diag(lam')^{1/2}`` from an eigendecomposition (:mod:`.whitener`). Any square root gives the same
spectra and factors' products, and every step uses the same ``C'``, which keeps the identities and the
monotonicity exact.

Matrix orientation: ``nn.Linear`` stores ``(out, in)`` and conv kernels ``(out, in*kh*kw)`` (Grams
over unfolded patches): linear orientation as stored. HF ``Conv1D`` stores ``(in, out)``: its matrix
is transposed on the way in and out (``orientation="in_out"``).
"""

from __future__ import annotations

import torch

from .lorst import rebalance, split_balanced
from .stack import LayerStack, orient
from .topk import gram_svd, lapack_threads
from .whitener import DEFAULT_FLOOR, EXACT_DAMP, Whitener, common_precision, stack_whiteners

CG_MAX_ITER = 10  # shared-part solve with output Grams: every iterate lowers the error (docs/calibration.md)
CG_SCREEN_ITER = 3  # the budget's solve, which only ranks sharing against none (docs/calibration.md); a kept part solves on
CG_TOL = 1e-8  # relative residual


Gram = torch.Tensor | Whitener  # a dense SPD matrix, or a Whitener's effective Gram (applied, never formed)


def _left(G: Gram, X: torch.Tensor) -> torch.Tensor:
    return G.times(X) if isinstance(G, Whitener) else G @ X


def _right(X: torch.Tensor, C: Gram) -> torch.Tensor:
    return C.times_right(X) if isinstance(C, Whitener) else X @ C


def _sum_into_first(terms) -> torch.Tensor:
    """The sum of freshly made tensors, added in place into the first (one accumulator; Python's
    ``sum`` makes a new tensor per term, two of them alive at each addition)."""
    total = None
    for term in terms:
        total = term if total is None else total.add_(term)
    return total


def _dense_sum(grams: list[Gram]) -> torch.Tensor:
    """``sum_i C_i`` as one dense matrix (each Whitener's Gram added into it in turn)."""
    total = None
    for C in grams:
        if isinstance(C, Whitener):
            total = C.gram(plus=total)
        else:
            total = C.clone() if total is None else total.add_(C)
    return total


def _mean_inverse(grams: list[Gram]) -> torch.Tensor:
    """``(sum_i C_i / N)^-1`` in the Grams' precision, summed in float64: the inverse through a
    Cholesky factor (half the time of an LU inverse), the LU one where the sum is not positive
    definite (a dense Gram given without a ridge)."""
    mean = _dense_sum(grams).div_(len(grams)).to(common_precision(grams[0]))
    with lapack_threads():
        root, info = torch.linalg.cholesky_ex(mean)
        return torch.cholesky_inverse(root) if int(info) == 0 else torch.linalg.inv(mean)


def weighted_shared(
    W: torch.Tensor | LayerStack,
    grams: list[Gram],
    private: torch.Tensor | None = None,
    left: list[Gram] | None = None,
    start: torch.Tensor | None = None,
    max_iter: int = CG_MAX_ITER,
    tol: float = CG_TOL,
) -> torch.Tensor:
    """``argmin_S sum_i ||M_i^T (W_i - P_i - S) L_i||^2``.

    ``W``: (N, out, in), read a layer at a time; ``grams``: N effective input Grams ``C_i``
    (in, in), dense or as :class:`Whitener` (applied as the whitener's effective Gram: a stack's Grams are
    never all formed); ``private``: N matrices (out, in) or None; ``left``: N effective output Grams
    ``G_i`` (out, out) or None (identity: closed form ``(sum_i (W_i - P_i) C_i)(sum_i C_i)^-1``). With ``left``, preconditioned
    conjugate gradients on ``sum_i G_i S C_i = sum_i G_i (W_i - P_i) C_i`` from ``start`` (default: the
    closed form without ``left``); every iterate lowers the error, so stopping at ``max_iter`` keeps
    any sweep monotone.
    """

    def target(i: int) -> torch.Tensor:  # W_i - P_i: (out, in)
        return W[i] if private is None else W[i] - private[i]

    owned = False  # whether the solve may update ``start`` in place
    if left is None or start is None:
        num = _sum_into_first(_right(target(i), grams[i]) for i in range(len(grams)))  # (out, in)
        den = _dense_sum(grams)  # (in, in), symmetric positive definite (floored)
        closed = torch.linalg.solve(den, num.T).T  # S den = num  <=>  den S^T = num^T
        if left is None:
            return closed
        start, owned = closed, True
        del num, den
    # the first residual sum_i G_i (W_i - P_i - S0) C_i in one product a side per layer (the
    # right-hand side and the start's image would take two)
    residual = _sum_into_first(
        _left(left[i], _right(target(i) - start, grams[i])) for i in range(len(grams))
    )  # (out, in)
    return _kron_sum_cg(left, grams, residual, start, max_iter, tol, owned)


def _kron_sum_cg(
    left: list[Gram],
    right: list[Gram],
    r: torch.Tensor,
    x: torch.Tensor,
    max_iter: int,
    tol: float,
    owned: bool = False,
) -> torch.Tensor:
    """Solve ``sum_i G_i X C_i = b`` (all ``G_i``, ``C_i`` SPD) by PCG from ``x``, given its residual
    ``r = b - sum_i G_i x C_i``; stops when the residual is ``tol`` times the first one.

    Preconditioner ``R -> Gbar^-1 R Cbar^-1`` (mean Grams): exact when the Grams of the stack are
    proportional to each other; applied in the Grams' precision, like the operator. ``r`` is
    overwritten, and ``x`` too when ``owned`` (else it is copied): at a 7B model's MLP shape each
    ``(out, in)`` iterate is 0.36 GB.
    """

    def apply(X):
        return _sum_into_first(_left(G, _right(X, C)) for G, C in zip(left, right, strict=False))

    G_inv = _mean_inverse(left)  # (out, out)
    C_inv = _mean_inverse(right)  # (in, in)
    work = common_precision(G_inv, C_inv)
    G_inv, C_inv = G_inv.to(work), C_inv.to(work)

    def precondition(R):
        return (G_inv @ R.to(work) @ C_inv).to(R.dtype)

    x = x if owned else x.clone()
    r_first = float(torch.linalg.matrix_norm(r)) or 1.0
    z = precondition(r)
    p = z.clone()
    rz = float((r * z).sum())
    for _ in range(max_iter):
        if float(torch.linalg.matrix_norm(r)) <= tol * r_first or rz <= 0.0:
            break
        Ap = apply(p)
        pAp = float((p * Ap).sum())
        if pAp <= 0.0:
            break
        alpha = rz / pAp
        x += alpha * p
        r -= alpha * Ap
        del Ap
        z = precondition(r)
        rz_next = float((r * z).sum())
        p = z + (rz_next / rz) * p
        rz = rz_next
    return x


def whitened_truncation(
    W: torch.Tensor | LayerStack,
    shared: torch.Tensor,
    whiteners: list[Whitener],
    ranks: list[int],
    left: list[Whitener] | None = None,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[float], list[float], list[torch.Tensor]]:
    """Best weighted rank-``k_i`` approximation of each residual ``R_i = W_i - shared`` (linear
    orientation), one layer's residual at a time.

    ``whiteners``: input side ``L_i``; ``left``: output side ``M_i`` or None (identity).
    Returns the factors ``(B_i (out, k), A_i (k, in))``, the whitened residual energy, the discarded
    whitened energy (the weighted error) and the whitened spectra ``s^2`` (descending), per layer.
    """
    svds = [
        whitened_svd(W[i] - shared, whiteners[i], None if left is None else left[i], keep=ranks[i])
        for i in range(len(ranks))
    ]
    return truncate_svds(svds, whiteners, ranks, left)


def whitened_svd(
    R: torch.Tensor, right: Whitener, left: Whitener | None, keep: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U, S, V^T`` of the whitened residual ``M^T R L``: ``U (out, k)``, ``S (m,)`` every singular
    value, ``V^T (k, in)``, ``m = min(out, in)``, ``k = keep`` (None: ``m``), from the eigenpairs of
    its smaller Gram (:func:`.topk.gram_svd`, float64 here)."""
    Z = whiten_residual(R, right, left)  # (out, in)
    return gram_svd(Z, min(Z.shape) if keep is None else keep)


def truncate_svds(
    svds: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    whiteners: list[Whitener],
    ranks: list[int],
    left: list[Whitener] | None = None,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[float], list[float], list[torch.Tensor]]:
    """:func:`whitened_truncation` from the residuals' whitened SVDs (:func:`whitened_svd`)."""
    factors, energy, discarded, spectra = [], [], [], []
    for i, (k, (U, S, Vh)) in enumerate(zip(ranks, svds, strict=True)):
        k = min(k, S.shape[0])
        B, A_white = split_balanced(U[:, :k], S[:k], Vh[:k])
        if left is not None:
            B = left[i].left_L_inv_T(B)  # M^-T U_k S_k^{1/2}: (out, k)
        factors.append(rebalance(B, whiteners[i].right_L_inv(A_white)))  # A: (k, in)
        s2 = S * S
        energy.append(float(s2.sum()))
        discarded.append(float(s2[k:].sum()))
        spectra.append(s2)
    return factors, energy, discarded, spectra


def whiten_residual(R: torch.Tensor, right: Whitener, left: Whitener | None) -> torch.Tensor:
    """``M^T R L``: the residual in the space where the weighted error is the Frobenius norm."""
    Z = right.right_L(R)  # (out, in)
    return Z if left is None else left.left_LT(Z)


def whitened_spectra(
    weights: list[torch.Tensor],
    grams: list[torch.Tensor],
    orientation: str = "out_in",
    floor: float = DEFAULT_FLOOR,
    damp: float = EXACT_DAMP,
    shared: bool = True,
    device: torch.device | str | None = None,
    shared_matrix: torch.Tensor | None = None,
    out_grams: list | None = None,
) -> list[torch.Tensor]:
    """Whitened residual spectra ``s^2`` per layer (what each rank unit would remove), for budgeting.

    ``shared=False`` gives the spectra of the layers themselves (no shared part); ``shared_matrix``
    (stored orientation) replaces the weighted least-squares shared part; ``out_grams``: output-side
    Grams (see :func:`~lors_convert.decompose.weighted.decompose_weighted`).
    """
    return shared_and_spectra(
        weights, grams, orientation, floor, damp, shared, device, shared_matrix, out_grams
    )[1]


def shared_and_spectra(
    weights: list[torch.Tensor],
    grams: list[torch.Tensor],
    orientation: str = "out_in",
    floor: float = DEFAULT_FLOOR,
    damp: float = EXACT_DAMP,
    shared: bool = True,
    device: torch.device | str | None = None,
    shared_matrix: torch.Tensor | None = None,
    out_grams: list | None = None,
) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """:func:`whitened_spectra` and the shared part they were taken against (stored orientation,
    float64; None with ``shared=False``). With output Grams that part is a screening solve
    (:data:`CG_SCREEN_ITER` iterations, enough to rank sharing against none), passed on to
    :func:`~lors_convert.decompose.weighted.decompose_weighted` (``screened=True``), which solves on from it."""
    W, wh, lw = prepare_stack(weights, grams, orientation, floor, damp, device, out_grams)
    S = _budget_shared(W, wh, lw, orientation, shared, shared_matrix)
    spectra = _layer_spectra(W, wh, lw, S)
    return (None if S is None else orient(S, orientation)), spectra


def sharing_spectra(
    weights: list[torch.Tensor],
    grams: list[torch.Tensor],
    orientation: str = "out_in",
    floor: float = DEFAULT_FLOOR,
    damp: float = EXACT_DAMP,
    device: torch.device | str | None = None,
    shared_matrix: torch.Tensor | None = None,
    out_grams: list | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """:func:`shared_and_spectra` plus the spectra of the layers themselves (no shared part), from
    one set of whiteners: the two structures a budget with ``sharing="auto"`` compares.
    Returns ``(shared part, residual spectra, the layers' own spectra)``."""
    W, wh, lw = prepare_stack(weights, grams, orientation, floor, damp, device, out_grams)
    S = _budget_shared(W, wh, lw, orientation, True, shared_matrix)
    return orient(S, orientation), _layer_spectra(W, wh, lw, S), _layer_spectra(W, wh, lw)


def _budget_shared(W, wh, lw, orientation, shared, shared_matrix):
    """The given shared part (linear orientation), the weighted least-squares one, or None."""
    if shared_matrix is not None:
        return W.read(shared_matrix)
    if shared:
        return weighted_shared(W, wh, left=lw, max_iter=CG_SCREEN_ITER)
    return None


def _layer_spectra(W: LayerStack, wh, lw, S: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Per layer, the descending ``s^2`` of the whitened ``W[i] - S`` (``W[i]`` without ``S``), on the
    CPU; one layer's residual at a time, whitened in the Grams' precision (float32 for Grams kept on
    disk: the spectra are as exact as the Grams they weigh by, in half the time of float64)."""
    spectra = []
    for i in range(len(W)):
        left = None if lw is None else lw[i]
        work = common_precision(wh[i], left)
        R = (W[i] if S is None else W[i] - S).to(work)  # (out, in)
        Z = whiten_residual(R, wh[i], left)  # (out, in)
        G = Z @ Z.T if Z.shape[0] <= Z.shape[1] else Z.T @ Z  # the smaller Gram: eigenvalues = s^2
        del R, Z
        with lapack_threads():
            spectra.append(torch.linalg.eigvalsh(G).to(torch.float64).clamp_min(0.0).flip(0).cpu())
    return spectra


def prepare_stack(weights, grams, orientation, floor, damp, device, out_grams=None):
    """The layers as a :class:`LayerStack` (float64, linear orientation, widened one at a time),
    input whiteners, output whiteners (or None)."""
    device = torch.device(device) if device is not None else weights[0].device
    W = LayerStack(weights, orientation, device)
    _, out, inp = W.shape
    wh = stack_whiteners(grams, len(weights), inp, floor, damp, device)
    lw = None
    if out_grams is not None and any(g is not None for g in out_grams):
        lw = stack_whiteners(out_grams, len(weights), out, floor, damp, device)
    return W, wh, lw


__all__ = [
    "prepare_stack",
    "whiten_residual",
    "whitened_svd",
    "truncate_svds",
    "shared_and_spectra",
    "sharing_spectra",
    "weighted_shared",
    "whitened_spectra",
    "whitened_truncation",
]
