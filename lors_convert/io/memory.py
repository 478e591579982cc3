"""Process memory: how much this machine has free, weights that own their memory, models that hold
none (parameters on the meta device), copies of a model that borrow its tensors, and results kept
for reuse up to a byte limit. (Giving freed memory back to the system: :mod:`lors_convert.heap`.)"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


def available_bytes() -> int | None:
    """``MemAvailable`` from ``/proc/meminfo`` in bytes; None where the kernel does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


@torch.no_grad()
def own_memory(model: nn.Module) -> None:
    """Copy every parameter and buffer of ``model`` out of the file it was mapped from.

    transformers maps safetensors files: a loaded model's tensors are views of the mapping, whose
    pages stay in the RSS while any tensor of the file lives, so the dense weights a conversion
    replaces would never be freed (the model's whole size held through the conversion). One
    tensor at a time; tied parameters stay tied (the same Parameter gets new data once)."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        t.data = t.data.clone()


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


def borrowing_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree that holds ``model``'s own parameters and buffers (the same
    tensor objects, so no memory but the modules'): a conversion of the copy replaces modules in it
    and reads the weights without changing them, and leaves ``model`` as it was."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


@torch.no_grad()
def stop_borrowing(copied: nn.Module, model: nn.Module) -> nn.Module:
    """Give ``copied`` (a :func:`borrowing_copy` of ``model``) its own copy of every tensor it still
    shares with ``model``; ties within ``copied`` stay ties. Returns ``copied``."""
    lent = {id(t) for t in itertools.chain(model.parameters(), model.buffers())}
    own: dict[int, torch.Tensor] = {}
    for module in copied.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is not None and id(t) in lent:
                    if id(t) not in own:
                        clone = t.detach().clone()
                        own[id(t)] = (
                            nn.Parameter(clone, t.requires_grad) if isinstance(t, nn.Parameter) else clone
                        )
                    table[name] = own[id(t)]
    return copied


class KeptResults:
    """Results (lists of tensors, or objects that say their ``nbytes``) by key, each computed once
    while they fit in ``limit`` bytes; past the limit, or for the key None, computed on every call."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self.kept: dict = {}

    def get(self, key, compute: Callable[[], object]):
        """``compute()``'s result for ``key``, computed once if it fits."""
        if key is not None and key in self.kept:
            return self.kept[key]
        value = compute()
        size = sum(t.nbytes for t in value) if isinstance(value, list | tuple) else value.nbytes
        if key is not None and self.used + size <= self.limit:
            self.kept[key] = value
            self.used += size
        return value


__all__ = [
    "available_bytes",
    "own_memory",
    "borrowing_copy",
    "stop_borrowing",
    "empty_model",
    "KeptResults",
]
