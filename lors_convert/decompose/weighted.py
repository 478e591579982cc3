"""The calibrated (weighted) fit of one stacked parameter, the math of :mod:`.whiten` put together:
a shared part, then each layer's whitened residual truncated to its rank.

The fit splits in two. :func:`weighted_basis` does all that does not depend on the ranks (the
layers, read as float64 in linear orientation one at a time (:mod:`.stack`), their whiteners, the
shared part ``W_s`` and the SVDs ``M_i^T (W_i - W_s) L_i = U_i S_i V_i^T``); :func:`truncated` keeps ``k_i`` singular triplets per
layer and maps them back, ``B_i = M_i^-T U_k S_k^{1/2}``, ``A_i = S_k^{1/2} V_k^T L_i^{-1}``. A search
over budgets computes the first once and the second per candidate. :func:`decompose_weighted` is
both, plus the refinement sweeps (shared part given the private parts, then re-truncate), which
depend on the ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .lorst import LayerFactors, StackFactors
from .stack import LayerStack, orient
from .whiten import (
    prepare_stack,
    truncate_svds,
    weighted_shared,
    whiten_residual,
    whitened_svd,
    whitened_truncation,
)
from .whitener import DEFAULT_FLOOR, EXACT_DAMP


@dataclass
class WeightedFactors(StackFactors):
    """:class:`StackFactors` plus the weighted (output) error bookkeeping."""

    weighted_residual: list[float] = field(default_factory=list)  # ||(W_i - W_s) L_i||^2
    weighted_error: list[float] = field(default_factory=list)  # ||(W_i - What_i) L_i||^2
    weighted_output: list[float] = field(default_factory=list)  # ||W_i L_i||^2 (output energy)
    history: list[float] = field(default_factory=list)  # total weighted error after each sweep

    @property
    def total_weighted_error(self) -> float:
        return sum(self.weighted_error)

    @property
    def relative_output_error(self) -> list[float]:
        """``||(W_i - What_i) X_i|| / ||W_i X_i||`` per layer on the calibration inputs."""
        return [
            math.sqrt(max(e, 0.0) / o) if o > 0 else 0.0
            for e, o in zip(self.weighted_error, self.weighted_output, strict=False)
        ]


def decompose_weighted(
    weights: list[torch.Tensor],
    ranks: list[int],
    grams: list[torch.Tensor | None] | None,
    orientation: str = "out_in",
    refine: int = 0,
    shared: torch.Tensor | None = None,
    floor: float = DEFAULT_FLOOR,
    damp: float = EXACT_DAMP,
    device: torch.device | str | None = None,
    shared_part: bool = True,
    out_grams: list | None = None,
    screened: bool = False,
) -> WeightedFactors:
    """Calibrated LORST factors of one stacked parameter.

    ``weights``: the N layers' tensors as stored; ``ranks``: total private rank per layer;
    ``grams``: per layer input Gram ``(in, in)`` (None: identity, i.e. the plain Frobenius error;
    with all None and ``refine=0`` this is the mean + SVD of :func:`lors_convert.decompose.lorst.decompose_stack` up to the shared
    part being the mean); ``out_grams``: per layer output-side Gram ``(out, out)`` in linear
    orientation (None: identity, the layer's own output error); ``orientation``: "out_in" (Linear,
    conv) or "in_out" (HF Conv1D, whose factors are returned as stored, ``B (in, k)``, ``A (k, out)``);
    ``refine``: alternating sweeps (shared <- weighted least squares given the private parts, then
    re-truncate), ``history`` holds the total weighted error after the initial fit and after each
    sweep (non-increasing); ``shared``: a given starting shared part (stored orientation);
    ``screened``: ``shared`` is a budget's screening solve (:data:`CG_SCREEN_ITER` iterations), which
    with output Grams is solved on from there (:data:`CG_MAX_ITER` more: a kept shared part costs
    what it did, a dropped one 3 iterations instead of 10);
    ``shared_part=False``: no shared part at all (per-layer low rank: a private-only stack; ``shared``
    in the result is zero and ``history`` constant).

    Errors (``relative_error``, ``retained_energy``) are the plain Frobenius figures of the design,
    the weighted ones are in ``weighted_*``. Float64 math, float32 results on ``device``.
    """
    basis = weighted_basis(
        weights, grams, orientation, shared, floor, damp, device, shared_part, out_grams, screened, keep=ranks
    )
    if refine == 0 or not shared_part:  # nothing to refine: the history stays flat
        return truncated(basis, ranks, refine)
    W, wh, lw, W_s = basis.W, basis.wh, basis.lw, basis.W_s
    factors, energy, discarded, _ = truncate_svds(basis.svds, wh, ranks, lw)
    history = [sum(discarded)]
    for _ in range(refine):
        P = [B @ A for B, A in factors]  # N private parts (out, in)
        W_s = weighted_shared(W, wh, P, left=lw, start=W_s)
        factors, energy, discarded, _ = whitened_truncation(W, W_s, wh, ranks, lw)
        history.append(sum(discarded))
    return _factors(basis, W_s, factors, energy, discarded, history)


@dataclass
class WeightedBasis:
    """What the weighted fit of one stacked parameter computes before it knows its ranks: the
    layers, their whiteners, the shared part and the whitened residuals' SVDs. :func:`truncated`
    gives the factors at any ranks from it, so a search over budgets fits each parameter once."""

    W: LayerStack  # (N, out, in): the layers as stored, read as float64 in linear orientation
    wh: list  # N input whiteners
    lw: list | None  # N output whiteners, or None
    W_s: torch.Tensor  # (out, in) the shared part (zero without one)
    svds: list  # N ``(U (out, m), S (m,), V^T (m, in))`` of ``M_i^T (W_i - W_s) L_i`` (m: min(out, in), or the kept rank)
    orientation: str

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors it holds itself (the layers are the source's, the whiteners' bases
        the calibration's)."""
        tensors = [self.W_s, *(t for svd in self.svds for t in svd)]
        return sum(t.nbytes for t in tensors)


def weighted_basis(
    weights: list[torch.Tensor],
    grams: list[torch.Tensor | None] | None,
    orientation: str = "out_in",
    shared: torch.Tensor | None = None,
    floor: float = DEFAULT_FLOOR,
    damp: float = EXACT_DAMP,
    device: torch.device | str | None = None,
    shared_part: bool = True,
    out_grams: list | None = None,
    screened: bool = False,
    keep: list[int] | None = None,
    layer_svds: bool = True,
) -> WeightedBasis:
    """The rank-independent part of :func:`decompose_weighted` (same arguments). ``keep``: the ranks
    it will be truncated at, when known: each layer finds only its leading ``k_i`` vectors (and every
    singular value) from its whitened residual's Gram (:func:`.topk.gram_svd`), so no full SVD is
    computed or held; None keeps full SVDs (a search truncates one basis at several budgets).
    ``layer_svds=False``: the shared part alone (no SVD), for private factors fitted elsewhere."""
    W, wh, lw = prepare_stack(weights, grams, orientation, floor, damp, device, out_grams)
    if not shared_part:
        W_s = torch.zeros(W.shape[1:], dtype=torch.float64, device=W.device)
    elif shared is not None:
        W_s = W.read(shared)
        if screened and lw is not None:
            W_s = weighted_shared(W, wh, left=lw, start=W_s)
    else:
        W_s = weighted_shared(W, wh, left=lw)
    svds = []
    for i in range(len(W) if layer_svds else 0):
        lw_i = None if lw is None else lw[i]
        svds.append(whitened_svd(W[i] - W_s, wh[i], lw_i, keep=None if keep is None else keep[i]))
    return WeightedBasis(W, wh, lw, W_s, svds, orientation)


def truncated(basis: WeightedBasis, ranks: list[int], refine: int = 0) -> WeightedFactors:
    """The factors at ``ranks`` from a :class:`WeightedBasis` (no refinement: ``history`` holds the
    error ``refine + 1`` times)."""
    factors, energy, discarded, _ = truncate_svds(basis.svds, basis.wh, ranks, basis.lw)
    return _factors(basis, basis.W_s, factors, energy, discarded, [sum(discarded)] * (refine + 1))


def _factors(basis: WeightedBasis, W_s, factors, energy, discarded, history) -> WeightedFactors:
    """The result of a fit: stored-orientation factors and the plain and weighted errors."""
    W, wh, lw, orientation = basis.W, basis.wh, basis.lw, basis.orientation
    layers = []
    outputs = []
    for i, (B, A) in enumerate(factors):
        W_i = W[i]  # (out, in)
        R = W_i - W_s
        D = R - B @ A
        outputs.append(float((whiten_residual(W_i, wh[i], None if lw is None else lw[i]) ** 2).sum()))
        res = float((R * R).sum())
        err = float((D * D).sum())
        if orientation == "in_out":
            B, A = A.T, B.T  # W^T = (B A)^T = A^T B^T: stored B (in, k), A (k, out)
        layers.append(
            LayerFactors(
                B=B.float(),
                A=A.float(),
                residual_energy=res,
                discarded_energy=err,
                weight_norm=float(torch.linalg.matrix_norm(W_i)),
            )
        )
    return WeightedFactors(
        shared=orient(W_s, orientation).float(),
        layers=layers,
        weighted_residual=energy,
        weighted_error=discarded,
        weighted_output=outputs,
        history=history,
    )


__all__ = ["WeightedBasis", "WeightedFactors", "decompose_weighted", "truncated", "weighted_basis"]
