"""LORS layer modules, one per kind of dense module they replace."""

from __future__ import annotations

import torch
from torch import nn

from .adaptive import LorsaLinear
from .base import LorsLayer, LorsModule, meta_clone
from .conv import LorsConv2d
from .conv1d import LorsConv1D, hf_conv1d_types
from .linear import LorsLinear

STATIC_LAYERS: tuple[type[LorsLayer], ...] = (LorsLinear, LorsConv2d, LorsConv1D)
ADAPTIVE_LAYERS: tuple[type[LorsModule], ...] = (LorsaLinear,)


def layer_class(kind: str) -> type[LorsModule]:
    """The LORS module class recorded in a checkpoint under ``kind`` ("linear", "conv2d", ...)."""
    for layer in STATIC_LAYERS + ADAPTIVE_LAYERS:
        if layer.layer_kind == kind:
            return layer
    raise KeyError(kind)


def static_layer_for(module: nn.Module) -> type[LorsLayer] | None:
    """The LORS layer that can stand in for ``module``, or None.

    Subclasses count only when they keep the base class's forward: a subclass with its own forward
    (quantized, custom) cannot be replaced faithfully.
    """
    if isinstance(module, torch.jit.ScriptModule):  # weights only: no forward to replace
        name = getattr(module, "original_name", "")
        return next(
            (layer for layer in STATIC_LAYERS if any(d.__name__ == name for d in layer.replaces())), None
        )
    for layer in STATIC_LAYERS:
        for dense in layer.replaces():
            if isinstance(module, dense) and type(module).forward is dense.forward:
                if (
                    isinstance(module, nn.Conv2d)
                    and type(module)._conv_forward is not nn.Conv2d._conv_forward
                ):
                    return None
                return layer
    return None


__all__ = [
    "LorsModule",
    "LorsLayer",
    "meta_clone",
    "LorsLinear",
    "LorsConv2d",
    "LorsConv1D",
    "STATIC_LAYERS",
    "ADAPTIVE_LAYERS",
    "LorsaLinear",
    "layer_class",
    "static_layer_for",
    "hf_conv1d_types",
]
