"""Running a model whose weights stay on disk: one stacked block in memory at a time.

A skeleton (parameters on the meta device, real non-persistent buffers, as
:func:`lors_convert.io.sources.open_lazy` builds it) runs with its weights read through a getter:
everything outside the stacked blocks (embeddings, final norm, head) is read once and stays; each
block (the outermost stack members, :mod:`lors_convert.discover.stacks`) reads its weights in a
forward pre-hook and drops them in a forward hook. Peak memory is then the resident part, one
block and the activations, whatever the model's size, so fidelity is measured on streamed models
too (the source, then its merged conversion, :mod:`lors_convert.convert_file`).

Parameters shared between modules (tied embeddings) are read once and stay shared.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..discover.stacks import find_stacks

Getter = Callable[[str], torch.Tensor]


def blocks_of(model: nn.Module) -> list[str]:
    """The outermost stack members' paths, in module order."""
    members = sorted({m for stack in find_stacks(model) for m in stack.members})
    outer = [m for m in members if not any(m.startswith(o + ".") for o in members if o != m)]
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(outer, key=order.__getitem__)


def _meta_slots(module: nn.Module, prefix: str, skip: tuple[str, ...] = ()) -> list[tuple[nn.Module, str, str, bool]]:
    """(owner, attribute, full name, is parameter) of every meta tensor under ``module``, first name of each."""
    slots = []
    for path, owner in module.named_modules(prefix=prefix, remove_duplicate=False):
        if skip and any(path == s or path.startswith(s + ".") for s in skip):
            continue
        for table, is_param in ((owner._parameters, True), (owner._buffers, False)):
            for attr, t in table.items():
                if t is None or not t.is_meta:
                    continue
                slots.append((owner, attr, f"{path}.{attr}" if path else attr, is_param))
    return slots


def _fill(slots, get: Getter) -> list[tuple[nn.Module, str, torch.Tensor, bool]]:
    """Read every slot's tensor (a tensor shared by several slots once); returns what to restore."""
    loaded: dict[int, torch.Tensor] = {}
    undo = []
    for owner, attr, name, is_param in slots:
        table = owner._parameters if is_param else owner._buffers
        meta = table[attr]
        if id(meta) not in loaded:
            t = get(name)
            loaded[id(meta)] = nn.Parameter(t, requires_grad=False) if is_param else t
        table[attr] = loaded[id(meta)]
        undo.append((owner, attr, meta, is_param))
    return undo


def _restore(undo) -> None:
    for owner, attr, meta, is_param in undo:
        (owner._parameters if is_param else owner._buffers)[attr] = meta


@contextmanager
def streamed(model: nn.Module, get: Getter, blocks: list[str] | None = None) -> Iterator[nn.Module]:
    """``model`` (a meta skeleton) made runnable with its weights from ``get(full name)``, block by
    block; on exit it is a skeleton again."""
    blocks = blocks_of(model) if blocks is None else blocks
    resident = _fill(_meta_slots(model, "", skip=tuple(blocks)), get)
    handles, loaded = [], []
    for path in blocks:
        module = model.get_submodule(path)
        slots = _meta_slots(module, path)
        undo: list = []
        loaded.append(undo)

        def load(mod, args, slots=slots, undo=undo):
            undo[:] = _fill(slots, get)

        def drop(mod, args, out, undo=undo):
            _restore(undo)
            undo.clear()

        handles += [module.register_forward_pre_hook(load), module.register_forward_hook(drop)]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
        for undo in loaded:  # a block whose forward raised
            _restore(undo)
        _restore(resident)


__all__ = ["blocks_of", "streamed"]
