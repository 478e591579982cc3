"""Model skeletons: the architecture with its parameters on the meta device (no weight memory)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def empty_model(factory: Callable[[], nn.Module]) -> nn.Module:
    """Build a model with parameters on the meta device and real (small) buffers."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = factory()
    # init_empty_weights re-registers every parameter as a new meta tensor, which unties the ties
    # transformers made at construction (lm_head / embeddings): tie them again
    if callable(getattr(model, "tie_weights", None)):
        model.tie_weights()
    return model


__all__ = ["empty_model"]
