"""The closed-loop pass: a converted model's private factors refitted block by block on the inputs
that the converted model gives them (the math: :mod:`lors_convert.decompose.closed_loop`).

Two hidden-state streams go through the stack, one block at a time, on the calibration batches:
the source's (``xs``, through a copy of each source block) and the converted model's (``xc``). At
block ``l`` the source block runs on ``xs``, and hooks keep the inputs ``Xs`` of each layer that the
conversion replaced with a :class:`~lors_convert.layers.linear.LorsLinear`. The layers are then
refitted in the order the block calls them, a group at a time (the layers that read one tensor,
q/k/v or gate/up, form one group): the converted block runs on ``xc``, with the groups before
refitted, and gives the group's inputs ``Xc``; ``C = Xc Xc^T`` and ``K = Xs Xc^T`` (means over the
real tokens) go to ``refit``. The refitted block then carries ``xc`` to block ``l + 1``, and the
source block's output carries ``xs``.

Memory: the two streams (two hidden states per calibration token), one block's activations, the
source inputs of one block's layers and one group's Grams. The blocks must form one chain: each
called once per forward, in order, with the same arguments besides the hidden state (masks, rotary
embeddings). :func:`block_chain` checks it; a model where it fails keeps its open-loop factors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..io.spill import SpilledModules
from ..layers.linear import LorsLinear
from .accumulate import add_gram, completed
from .batches import (
    Batch,
    batch_mask,
    model_device,
    no_cache,
    primary_output,
    run_model,
    to_device,
    token_rows,
)

# refit([(weight key, converted layer, source layer) of a group], C (in, in), K (in, in)): replaces
# the factors of the layers that read the group's input
Refit = Callable[[list[tuple[str, LorsLinear, nn.Linear]], torch.Tensor, torch.Tensor], None]


class _Stop(Exception):
    """Raised by a pre-hook to end a forward pass at the first block."""


def block_chain(model: nn.Module, members: list[str], batch: Batch) -> str | None:
    """Why the ``members`` cannot be walked as one chain on ``batch`` (None: they can)."""
    calls: list[tuple[str, tuple, dict, torch.Tensor | None]] = []  # (block, context args, kwargs, hidden)
    handles = [
        model.get_submodule(m).register_forward_pre_hook(
            lambda mod, args, kwargs, m=m: calls.append((m, args[1:], kwargs, args[0] if args else None)),
            with_kwargs=True,
        )
        for m in members
    ]
    try:
        with torch.no_grad(), no_cache(model):
            run_model(model, to_device(batch, model_device(model)))
    finally:
        for h in handles:
            h.remove()
    if [c[0] for c in calls] != list(members):
        return "its stacked blocks do not run once each, in order"
    first = calls[0]
    if any(not isinstance(c[3], torch.Tensor) for c in calls):
        return "its stacked blocks do not take the hidden state as their first argument"
    if any(not _same(c[1], first[1]) or not _same(c[2], first[2]) for c in calls[1:]):
        return "its stacked blocks take different arguments"
    return None


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and (a is b or (a.shape == b.shape and torch.equal(a, b)))
        )
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or a == b


def first_block_calls(model: nn.Module, first: str, batches: list[Batch]) -> list[tuple[tuple, dict]]:
    """Each batch's call of block ``first`` (``args``, ``kwargs``), the forward stopped there."""
    calls = []

    def hook(mod, args, kwargs):
        calls.append((args, dict(kwargs)))
        raise _Stop

    handle = model.get_submodule(first).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                run_model(model, to_device(batch, model_device(model)))
            except _Stop:
                pass
    finally:
        handle.remove()
    return calls


class _Inputs:
    """Forward pre-hooks keeping the last input of each named ``nn.Linear`` of a block; with ``stop``,
    the block's forward ends (:class:`_Stop`) once they have it."""

    def __init__(self, block: nn.Module, names: list[str], stop: bool = False):
        self.last: dict[str, torch.Tensor] = {}

        def keep(n: str, x: torch.Tensor) -> None:
            self.last[n] = x
            if stop and len(self.last) == len(names):
                raise _Stop

        self.handles = [
            block.get_submodule(n).register_forward_pre_hook(lambda mod, args, n=n: keep(n, args[0]))
            for n in names
        ]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _rows(inputs: dict[str, torch.Tensor], names: list[str], mask) -> dict[str, torch.Tensor]:
    """The named layers' inputs as rows ``(positions, in)`` (real tokens), one copy per input tensor."""
    rows: dict[int, torch.Tensor] = {}
    return {n: rows.setdefault(id(inputs[n]), token_rows(inputs[n], mask)) for n in names}


def _groups(order: list[str], inputs: dict[str, torch.Tensor]) -> list[list[str]]:
    """The layers in call order, cut where the input changes (q/k/v read one tensor: one group)."""
    groups: list[list[str]] = []
    for n in order:
        if groups and inputs[n] is inputs[groups[-1][0]]:
            groups[-1].append(n)
        else:
            groups.append([n])
    return groups


def _source_side(source, names, calls, xs, masks):
    """The source block on the source stream: per batch its layers' input rows and its output, and
    the layers grouped in call order."""
    taps = _Inputs(source, names)
    rows, outputs, groups = [], [], None
    try:
        for (args, kwargs), s, mask in zip(calls, xs, masks, strict=True):
            outputs.append(primary_output(source(s, *args[1:], **kwargs)))
            groups = groups or _groups(list(taps.last), taps.last)
            rows.append(_rows(taps.last, names, mask))
            taps.last.clear()
    finally:
        taps.remove()
    return rows, outputs, groups or []


@contextmanager
def _formed(block: nn.Module) -> Iterator[nn.Module]:
    """``block`` with each :class:`LorsLinear` swapped for the dense ``nn.Linear`` of its factors as they
    are now (put back on exit). A pass over the calibration batches runs thousands of rows through
    each layer, where ``W_i`` (d, h) is one product of the factors: the dense product of a row costs
    ``d h`` multiply-adds, the factored one ``d h + k (d + h)``."""
    layers = [(n, m) for n, m in block.named_modules() if isinstance(m, LorsLinear)]
    for n, m in layers:
        block.set_submodule(n, m.to_dense())
    try:
        yield block
    finally:
        for n, m in layers:
            block.set_submodule(n, m)


def _group_grams(block, group, calls, xc, masks, source_rows) -> tuple[torch.Tensor, torch.Tensor]:
    """``C = Xc Xc^T`` and ``K = Xs Xc^T`` (means) of one group's input in the converted ``block`` as
    it is now, over every batch: float32 for float32/16 models, like the calibration's Grams."""
    C = K = None
    count = 0
    with _formed(block):
        taps = _Inputs(block, group[:1], stop=True)  # the rest of the block is not needed
        try:
            for (args, kwargs), c, mask, rs in zip(calls, xc, masks, source_rows, strict=True):
                try:
                    block(c, *args[1:], **kwargs)
                except _Stop:
                    pass
                rc = token_rows(taps.last[group[0]], mask)  # (P, in)
                work = torch.float64 if rc.dtype == torch.float64 else torch.float32
                rc, s = rc.to(work), rs[group[0]].to(work)  # (P, in) each
                C = add_gram(C, rc)  # (in, in), upper blocks
                K = s.T @ rc if K is None else K.addmm_(s.T, rc)  # (in, in)
                count += rc.shape[0]
                taps.last.clear()
        finally:
            taps.remove()
    return completed(C).div_(max(count, 1)), K.div_(max(count, 1))


@torch.no_grad()
def closed_loop_pass(
    model: nn.Module,
    source_blocks: dict[str, nn.Module] | SpilledModules,
    batches: list[Batch],
    refit: Refit,
) -> int:
    """Refit every :class:`LorsLinear` in the blocks of the converted ``model`` that
    ``source_blocks`` names, in its order (each block's path -> its source block, consumed: dropped
    once used). Returns the number of layers refitted (those of rank 0 are passed to ``refit`` too,
    which has only their error to measure)."""
    with no_cache(model):
        return _walk(model, source_blocks, list(source_blocks), batches, refit)


def _walk(model, source_blocks, members, batches, refit) -> int:
    calls = first_block_calls(model, members[0], batches)
    masks = [batch_mask(b) for b in batches]
    xs = [args[0] for args, _ in calls]  # (B, T, H) per batch: the streams start equal
    xc = list(xs)
    done = 0
    for name in members:
        block, source = model.get_submodule(name), source_blocks.pop(name)
        names = [n for n, m in block.named_modules() if isinstance(m, LorsLinear)]  # rank 0: measured only
        source_rows, outputs, groups = _source_side(source, names, calls, xs, masks)
        for group in groups:  # each on the inputs the groups before it, refitted, give it
            C, K = _group_grams(block, group, calls, xc, masks, source_rows)
            refit(
                [(f"{name}.{n}.weight", block.get_submodule(n), source.get_submodule(n)) for n in group], C, K
            )
            done += sum(block.get_submodule(n).total_rank > 0 for n in group)
        with _formed(block):
            xc = [
                primary_output(block(c, *args[1:], **kwargs))
                for c, (args, kwargs) in zip(xc, calls, strict=True)
            ]
        xs = outputs
        del source_rows, outputs, source
    return done


__all__ = ["closed_loop_pass", "block_chain", "first_block_calls", "Refit"]
