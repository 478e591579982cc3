"""Closed-loop private factors: a layer's low-rank part fitted on the inputs the converted model
gives it, aimed at what the source layer computes on the source's inputs.

An open-loop fit weights layer ``i``'s error by the source's inputs ``X`` as if they were exact. In
the converted model the errors of the blocks before it reach it, and its inputs are ``Xc != Xs``.
With the shared part ``W_s`` and the rank ``k`` fixed, the closed-loop private part is

    P = argmin_{rank P <= k} || M^T (W Xs - (W_s + P) Xc) ||_F^2        (rows of Xs, Xc: positions)

(``M M^T = G`` the output-side Gram, identity without one). With ``C = Xc Xc^T`` and
``K = Xs Xc^T`` (means over the positions), the error is ``||M^T (W' - W_s - P) L||^2`` plus a
constant, where ``W' = W K C^-1`` is the least-squares map from the converted inputs to the source's
outputs and ``L L^T = C``: the same whitened truncated SVD as the open-loop fit
(:mod:`.whiten`), of ``W' - W_s`` under the converted inputs' Gram. With ``Xc = Xs`` it is the
open-loop fit.

The full correction fits the upstream errors of the calibration text, and those differ on other
text. The conversion aims half-way, ``K_a = a K + (1 - a) C`` with ``a = CORRECTION = 1/2``: ``a = 0``
fits ``W`` itself on the converted inputs (no compensation), ``a = 1`` compensates fully
(docs/calibration.md, "Closed-loop calibration", measures the three). ``C`` is floored and damped like every Gram (:func:`~.whitener.whitener`): the
effective ``C' = C + E`` is the Gram of the objective plus the ridge ``tr(D E D^T)`` on ``D = W - What``,
so the map becomes ``W' = W (K + E) C'^-1``, which is ``W`` again when ``Xc = Xs``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .topk import gram_svd
from .whiten import truncate_svds
from .whitener import Whitener, common_precision, stack_whiteners

CORRECTION = 0.5  # the share of the upstream error the fit compensates (see the module docstring)


@dataclass
class LoopInputs:
    """What the layers that read one input share in a closed-loop refit (q/k/v, gate/up): the
    converted inputs' effective Gram ``C'`` as a whitener, and ``K_a + C' - C``, the right factor
    of the least-squares map ``W' = W (K_a + C' - C) C'^-1``."""

    right: Whitener
    mix: torch.Tensor  # (in, in)


def loop_inputs(
    C: torch.Tensor, K: torch.Tensor, floor: float = 0.0, damp: float = 0.0, correction: float = 1.0
) -> LoopInputs:
    """The :class:`LoopInputs` of ``C`` (in, in), the converted inputs' Gram, and ``K`` (in, in), the
    cross Gram ``Xs Xc^T``, with ``C`` floored and damped like every Gram; ``correction``: ``a`` (the
    conversion passes :data:`CORRECTION`). One square root of ``C`` for the whole group, in ``C``'s
    precision."""
    right = stack_whiteners([C], 1, C.shape[0], floor, damp, C.device)[0]
    # K_a + C' - C = a (K - C) + C': one (in, in) matrix beside C, K and the square root
    mix = torch.sub(K.to(torch.float64), C).mul_(correction)
    return LoopInputs(right, right.gram(plus=mix).to(C.dtype))


class LoopFactors(NamedTuple):
    """One layer's closed-loop fit: the factors and its whitened energies (the objective's units)."""

    B: torch.Tensor  # (out, k), in the fit's precision
    A: torch.Tensor  # (k, in)
    energy: float  # ||M^T (W' - W_s) L||^2
    discarded: float  # the part of it the rank leaves out: the objective's value, less its constant
    output: float  # ||M^T W' L||^2, what the relative output error is relative to


def closed_loop_factors(
    W: torch.Tensor,
    shared: torch.Tensor | None,
    inputs: LoopInputs,
    rank: int,
    out_gram=None,
    floor: float = 0.0,
    damp: float = 0.0,
) -> LoopFactors:
    """The closed-loop private factors ``B (out, k)``, ``A (k, in)`` of one layer.

    ``W`` (out, in): the source layer; ``shared``: ``W_s`` (out, in) or None (private-only);
    ``inputs``: :func:`loop_inputs` of the layer's input; ``out_gram``: the output-side Gram (a dense
    matrix or a :class:`~.whitener.ScaledGram`) or None, floored and damped by ``floor``, ``damp``.
    The fit runs in the Grams' precision (float32 when the calibration's and the loop's Grams are:
    the fit is as exact as the Grams it weighs by, in half the time of float64).
    """
    left = None if out_gram is None else stack_whiteners([out_gram], 1, W.shape[0], floor, damp, W.device)[0]
    work = common_precision(inputs.mix, left)
    W = W.to(work)
    # W' L = W mix C'^-1 L = W mix L^-T: the whitened target by one triangular solve
    Z = inputs.right.right_L_inv_T(W @ inputs.mix.to(work))  # (out, in)
    output = None
    if shared is not None:  # (W' - W_s) L
        output = float((Z if left is None else left.left_LT(Z)).square().sum())
        Z = Z - inputs.right.right_L(shared.to(work))
    if left is not None:
        Z = left.left_LT(Z)  # M^T (W' - W_s) L
    if rank == 0:  # nothing to fit: the whole residual is the error
        energy = float(Z.square().sum())
        empty = W.new_zeros(W.shape[0], 0), W.new_zeros(0, W.shape[1])
        return LoopFactors(*empty, energy, energy, energy if output is None else output)
    (factors, energy, discarded, _) = truncate_svds(
        [gram_svd(Z, rank)], [inputs.right], [rank], None if left is None else [left]
    )
    output = energy[0] if output is None else output
    return LoopFactors(factors[0][0], factors[0][1], energy[0], discarded[0], output)


__all__ = ["closed_loop_factors", "loop_inputs", "LoopFactors", "LoopInputs", "CORRECTION"]
