"""The closed-loop refit of one converted layer: :func:`refitter` gives the ``refit`` that
:func:`lors_convert.calibrate.closed_loop.closed_loop_pass` calls for each layer, with the
calibration's output-side Gram of that layer (the K-FAC weighting of the open-loop fit) and the
conversion's floor and damping (:mod:`lors_convert.decompose.closed_loop` has the math).
"""

from __future__ import annotations

import torch
from torch import nn

from ..decompose.closed_loop import CORRECTION, closed_loop_factors, loop_inputs
from .calibrated import floor_and_damp, output_gram


def refitter(calibration, floor: float | None = None, damp: float | None = None):
    """``refit(group, C, K)``: each ``(key, layer, source)`` of a group of layers that read one input
    gets the closed-loop private factors at its rank (the shared part stays); the group shares one
    square root of ``C``."""
    floor, damp = floor_and_damp(floor, damp)

    def refit(group: list[tuple[str, nn.Module, nn.Linear]], C: torch.Tensor, K: torch.Tensor) -> None:
        inputs = loop_inputs(C, K, floor, damp, CORRECTION)
        for key, layer, source in group:
            W = source.weight.detach()  # (out, in)
            out_gram = output_gram(calibration, key, W.shape[0])
            shared = None if layer.shared is None else layer.shared.detach()
            B, A, _, _ = closed_loop_factors(W, shared, inputs, layer.total_rank, out_gram, floor, damp)
            with torch.no_grad():
                layer.lors_B.copy_(B)
                layer.lors_A.copy_(A)

    return refit


__all__ = ["refitter"]
