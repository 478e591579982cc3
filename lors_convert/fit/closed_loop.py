"""The closed-loop refit of one converted layer: :func:`refitter` gives the ``refit`` that
:func:`lors_convert.calibrate.closed_loop.closed_loop_pass` calls for each layer, with the
calibration's output-side Gram of that layer (the K-FAC weighting of the open-loop fit) and the
conversion's floor and damping (:mod:`lors_convert.decompose.closed_loop` has the math).
:func:`record_refits` puts what the refits measured into the conversion's fits and report rows,
which until then describe the open-loop factors (or, for a fit the loop was left, none).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..decompose.closed_loop import CORRECTION, closed_loop_factors, loop_inputs
from .calibrated import floor_and_damp, output_gram
from .result import Fit


@dataclass
class RefitFigures:
    """What one layer's refit measured: the report's plain figures and the weighted ones."""

    relative_error: float  # ||W - W_s - B A||_F / ||W||_F
    retained_energy: float  # 1 - ||W - W_s - B A||_F^2 / ||W - W_s||_F^2
    weighted_error: float  # the closed-loop objective's discarded energy
    weighted_output: float  # ||M^T W' L||^2


def refitter(calibration, floor: float | None = None, damp: float | None = None, figures: dict | None = None):
    """``refit(group, C, K)``: each ``(key, layer, source)`` of a group of layers that read one input
    gets the closed-loop private factors at its rank (the shared part stays); the group shares one
    square root of ``C``. ``figures``: receives each refitted key's :class:`RefitFigures`."""
    floor, damp = floor_and_damp(floor, damp)

    def refit(group: list[tuple[str, nn.Module, nn.Linear]], C: torch.Tensor, K: torch.Tensor) -> None:
        inputs = loop_inputs(C, K, floor, damp, CORRECTION)
        for key, layer, source in group:
            W = source.weight.detach()  # (out, in), as stored: the fit works in its Grams' precision
            out_gram = output_gram(calibration, key, W.shape[0])
            shared = None if layer.shared is None else layer.shared.detach()
            fit = closed_loop_factors(W, shared, inputs, layer.total_rank, out_gram, floor, damp)
            with torch.no_grad():
                layer.lors_B.copy_(fit.B)
                layer.lors_A.copy_(fit.A)
            if figures is not None:
                figures[key] = _figures(W.double(), shared, fit)

    return refit


def _figures(W: torch.Tensor, shared: torch.Tensor | None, fit) -> RefitFigures:
    R = W if shared is None else W - shared.double()  # (out, in)
    residual = float(R.square().sum())
    error = float((R - fit.B @ fit.A).square().sum())
    norm = float(W.square().sum())
    return RefitFigures(
        relative_error=math.sqrt(error / norm) if norm else 0.0,
        retained_energy=1.0 - error / residual if residual > 0 else 1.0,
        weighted_error=fit.discarded,
        weighted_output=fit.output,
    )


def record_refits(
    params: list, matrices: list, fits: dict[int, Fit], figures: dict[str, RefitFigures]
) -> None:
    """Replace the figures of every refitted layer in ``fits`` (by plan index) and in the report's
    ``matrices`` rows (parallel to the plan's ``params``); layers the loop did not refit keep theirs,
    members kept dense their exact 0 and 1."""
    for index, (pp, row) in enumerate(zip(params, matrices, strict=True)):
        if index not in fits or not any(key in figures for key in pp.keys):
            continue
        fit = fits[index]
        n = len(pp.keys)
        errors = list(row.relative_error) or [0.0] * n
        energies = list(row.retained_energy) or [1.0] * n
        members = pp.lors_members
        old = fit.weighted or ([0.0] * len(members), [0.0] * len(members), [0.0])
        weighted_errors, outputs = list(old[0]), list(old[1])
        for j, i in enumerate(members):
            f = figures.get(pp.keys[i])
            if f is not None:
                errors[i], energies[i] = f.relative_error, f.retained_energy
                weighted_errors[j], outputs[j] = f.weighted_error, f.weighted_output
        row.relative_error, row.retained_energy = errors, energies
        fit.relative_error, fit.retained_energy = errors, energies
        fit.weighted = (weighted_errors, outputs, [sum(weighted_errors)] * len(old[2]))


__all__ = ["refitter", "record_refits", "RefitFigures"]
