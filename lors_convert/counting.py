"""Parameter counting that counts shared or tied storage once."""

from __future__ import annotations

from torch import nn


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of distinct parameter elements: a tensor reachable under several names counts once."""
    seen: set = set()
    total = 0
    for p in module.parameters():  # already deduplicates identical Parameter objects
        if trainable_only and not p.requires_grad:
            continue
        key = (
            id(p)
            if p.device.type == "meta"
            else (p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.shape))
        )
        if key in seen:
            continue
        seen.add(key)
        total += p.numel()
    return total
