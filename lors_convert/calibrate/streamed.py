"""Running a model whose weights stay on disk: one stacked block in memory at a time.

A skeleton (parameters on the meta device, real non-persistent buffers, as
:func:`lors_convert.io.sources.open_lazy` builds it) runs with its weights read through a getter:
everything outside the stacked blocks (embeddings, final norm, head) is read once and stays; each
block (the outermost stack members, :mod:`lors_convert.discover.stacks`) is read when the batches
reach it and dropped when they have all gone through. Peak memory is then the resident part, one
block and the batches' activations, whatever the model's size, so fidelity is measured on streamed
models too (the source, then its merged conversion, :mod:`lors_convert.convert_file`). Parameters
shared between modules (tied embeddings) are read once and stay shared.

:func:`lockstep` reads each block once for all the batches, not once per batch: every batch runs
in a greenlet of its own (a call stack that can be suspended, in the caller's thread: an OS thread
per batch would cost each its own allocator arena and BLAS buffers) that waits at
each block's entry; the caller reads the block the waiting batches want first, lets each of them
through it in turn, and drops it. Memory holds the resident part, one block and every batch's
activations at a block boundary (one hidden state each); the outputs come back one at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import greenlet
import torch
from torch import nn

from ..discover.stacks import find_stacks
from ..heap import trim
from .batches import Batch, no_cache, run_model

Getter = Callable[[str], torch.Tensor]


def blocks_of(model: nn.Module) -> list[str]:
    """The outermost stack members' paths, in module order."""
    members = sorted({m for stack in find_stacks(model) for m in stack.members})
    outer = [m for m in members if not any(m.startswith(o + ".") for o in members if o != m)]
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(outer, key=order.__getitem__)


def _meta_slots(
    module: nn.Module, prefix: str, skip: tuple[str, ...] = ()
) -> list[tuple[nn.Module, str, str, bool]]:
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


class _Batch:
    """One batch's forward pass as a greenlet that hands control back at every block's entry."""

    def __init__(self, model: nn.Module, batch: Batch):
        self.want: str | None = None  # the block it waits at; None: finished
        self.out = None
        self.reported = False  # its output was handed out
        self._greenlet = greenlet.greenlet(lambda: run_model(model, batch))

    def step(self) -> None:
        """Run the batch to its next block entry or to its end (its errors are raised here)."""
        with torch.no_grad():  # grad mode is per thread: set only while the batch runs
            wanted = self._greenlet.switch()
        if self._greenlet.dead:
            self.want, self.out = None, wanted
        else:
            self.want = wanted

    def cancel(self) -> None:
        if not self._greenlet.dead:
            self._greenlet.throw(greenlet.GreenletExit)  # unwinds its frames


def lockstep(
    model: nn.Module, get: Getter, batches: Iterable[Batch], blocks: list[str] | None = None
) -> Iterator[tuple[int, object]]:
    """``(i, model output on batches[i])`` for every batch, with ``model`` (a meta skeleton) reading
    each block's weights once for all batches (see the module docstring). Inference only (no
    gradients); a model's key/value cache is turned off for the run (every batch would keep one).
    Batches come back as they finish: in order when every batch runs the blocks in the same order."""
    blocks = blocks_of(model) if blocks is None else blocks
    order = {path: i for i, path in enumerate(blocks)}
    slots = {path: _meta_slots(model.get_submodule(path), path) for path in blocks}
    main = greenlet.getcurrent()

    def entry(path):
        def hook(mod, args):
            if greenlet.getcurrent() is not main:  # a batch: wait here until the block is read
                main.switch(path)

        return hook

    handles = [model.get_submodule(path).register_forward_pre_hook(entry(path)) for path in blocks]
    with no_cache(model):
        resident = _fill(_meta_slots(model, "", skip=tuple(blocks)), get)
        runs: list[_Batch] = []
        undo: list = []
        try:
            for batch in batches:  # each up to its first block
                runs.append(_Batch(model, batch))
                runs[-1].step()
                yield from _finished(runs, len(runs) - 1)
            while any(run.want is not None for run in runs):
                path = min((run.want for run in runs if run.want is not None), key=order.__getitem__)
                _restore(undo)
                undo = []  # nothing half-restored if the read fails
                undo = _fill(slots[path], get)
                for i, run in enumerate(runs):
                    if run.want == path:
                        run.step()
                        yield from _finished(runs, i)
                trim()  # the block's work is freed; the heap holds each batch's hidden state
        finally:
            for run in runs:
                run.cancel()
            for h in handles:
                h.remove()
            _restore(undo)
            _restore(resident)


def _finished(runs: list[_Batch], i: int) -> Iterator[tuple[int, object]]:
    """Batch ``i``'s output if it has just finished."""
    run = runs[i]
    if run.want is None and not run.reported:
        out, run.out, run.reported = run.out, None, True
        yield i, out


__all__ = ["blocks_of", "lockstep"]
