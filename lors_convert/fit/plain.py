"""Uncalibrated fits: LORST's mean + truncated SVD, and the paper's from-scratch init."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from ..decompose.lorst import decompose_lazily, stack_matrices
from ..discover.plan import ParamPlan
from ..errors import LorsError
from .result import Fit


def fit_plain(pp: ParamPlan, weights: Sequence[torch.Tensor], method: str = "auto", device=None) -> Fit:
    """``W_s = mean_i W_i`` and the top ``pp.ranks[i]`` SVD components of each residual.

    The factors come as an iterator, solved chunk by chunk as the sink stores them (see
    :class:`Fit`), so a streamed conversion holds the stacked group and one chunk's work."""
    try:
        W = stack_matrices(weights, device, names=pp.keys)  # (N, d, h), checked finite
    except ValueError as e:
        raise LorsError(str(e)) from None
    shared, layers = decompose_lazily(W, pp.ranks, method=method)
    del W  # the residuals live in the iterator now
    fit = Fit(shared=shared if pp.has_shared else None, factors=[])

    def factors() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for layer in layers:
            fit.relative_error.append(layer.relative_error)
            fit.retained_energy.append(layer.retained_energy)
            yield layer.B, layer.A

    fit.factors = factors()
    return fit


def paper_init(pp: ParamPlan, generator: torch.Generator | None = None) -> Fit:
    """The paper's from-scratch initialization: Kaiming-uniform ``W_s`` and ``B``, zero ``A``."""
    d, h = pp.param.shape[0], math.prod(pp.param.shape[1:])

    def kaiming(rows: int, cols: int) -> torch.Tensor:
        t = torch.empty(rows, cols)
        bound = 1.0 / math.sqrt(cols) if cols else 0.0  # kaiming_uniform_(a=sqrt(5)), as nn.Linear
        return t.uniform_(-bound, bound, generator=generator)

    shared = kaiming(d, h)
    return Fit(
        shared=shared if pp.has_shared else None,
        factors=[(kaiming(d, k), torch.zeros(k, h)) for k in pp.ranks],
    )
