"""Stack discovery: find runs of identically-shaped sibling submodules by walking the module tree.

A *stack* is a group of >= 2 siblings whose structural signature is equal: the member's class and
every parameter's and buffer's relative name, shape and dtype. Nothing is run and nothing is traced,
so discovery works on a model built on the meta device.

Siblings are grouped inside containers (``ModuleList``, ``Sequential``, ``ModuleDict``) whatever the
members are, and inside any other module only when the members are composite (have children):
``q_proj``/``k_proj``/``v_proj`` of one attention block are equal-shaped leaves but not a stack.
Once a stack is found its members are not searched again; other modules are descended into.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import LorsUsageError

_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)


@dataclass(frozen=True)
class StackedParam:
    """One parameter shared across a stack, e.g. ``attn.c_attn.weight`` of ``transformer.h.*``."""

    relname: str  # name relative to a member, e.g. "attn.c_attn.weight"
    shape: tuple[int, ...]
    dtype: torch.dtype
    owner_class: type  # class of the module that owns the parameter (nn.Linear, Conv1D, ...)

    @property
    def owner_relpath(self) -> str:
        return self.relname.rpartition(".")[0]

    @property
    def attr(self) -> str:
        return self.relname.rpartition(".")[2]


@dataclass
class Stack:
    """A group of sibling submodules with equal structural signature."""

    path: str  # the parent module's path ("" for the root)
    members: list[str]  # full paths of the members, in module order
    member_class: type
    params: list[StackedParam] = field(default_factory=list)  # the >= 2-D parameters
    excluded: dict[str, str] = field(default_factory=dict)  # relname -> why it stays per layer

    def __len__(self) -> int:
        return len(self.members)

    def keys(self, relname: str) -> list[str]:
        """Full state-dict keys of one stacked parameter, one per member."""
        return [f"{m}.{relname}" for m in self.members]


def structural_signature(module: nn.Module) -> tuple:
    """Class plus (relative name, shape, dtype) of every parameter and buffer."""
    params = tuple(
        (name, tuple(p.shape), p.dtype) for name, p in module.named_parameters(remove_duplicate=False)
    )
    buffers = tuple(
        (name, tuple(b.shape), b.dtype) for name, b in module.named_buffers(remove_duplicate=False)
    )
    # TorchScript modules are all RecursiveScriptModule: their original class name tells them apart
    kind = getattr(module, "original_name", None) if isinstance(module, torch.jit.ScriptModule) else None
    return (kind or type(module), params, buffers)


def _candidate_groups(parent: nn.Module) -> list[list[tuple[str, nn.Module]]]:
    """Groups of >= 2 children of ``parent`` with equal signature, in child order."""
    children = list(parent.named_children())
    is_container = isinstance(parent, _CONTAINERS)
    by_signature: dict[tuple, list[tuple[str, nn.Module]]] = {}
    for name, child in children:
        if not is_container and not any(True for _ in child.children()):
            continue  # leaf siblings of a plain module (q/k/v projections) are not a stack
        sig = structural_signature(child)
        if not any(len(shape) >= 2 for _, shape, _ in sig[1]):
            continue  # nothing to share
        by_signature.setdefault(sig, []).append((name, child))
    return [group for group in by_signature.values() if len(group) >= 2]


def _param_owners(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every full name under which it is reachable (ties show up as >1 names)."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    return owners


def _memory_span(p: torch.Tensor) -> tuple[int, int, int] | None:
    """(storage, first byte, end byte) of the memory ``p`` can address; None on meta or empty."""
    if p.device.type == "meta" or p.numel() == 0:
        return None
    extent = 1 + sum((size - 1) * abs(stride) for size, stride in zip(p.shape, p.stride(), strict=False))
    start = p.storage_offset() * p.element_size()
    return p.untyped_storage().data_ptr(), start, start + extent * p.element_size()


def _overlapping(params) -> set[int]:
    """ids of the parameters whose memory overlaps another Parameter object's (ties by storage).

    Disjoint slices of one flat buffer (``vector_to_parameters``, flat-buffer loaders) are
    independent tensors, not ties.
    """
    by_storage: dict[int, list[tuple[int, int, int]]] = {}
    for p in {id(p): p for p in params}.values():
        span = _memory_span(p)
        if span is not None:
            by_storage.setdefault(span[0], []).append((span[1], span[2], id(p)))
    tied: set[int] = set()
    for spans in by_storage.values():
        spans.sort()
        reach_end, reach_id = -1, None  # the furthest end seen so far and its owner
        for start, end, pid in spans:
            if start < reach_end:
                tied.update((pid, reach_id))
            if end > reach_end:
                reach_end, reach_id = end, pid
    return tied


def find_stacks(
    model: nn.Module,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
) -> list[Stack]:
    """Find the stacks of ``model`` and their shareable (>= 2-D, untied) parameters.

    ``include``/``exclude`` are fnmatch patterns over full parameter names (``*attn*``,
    ``transformer.h.*.mlp.*``); a stacked parameter is kept when some member's name matches an
    include pattern (all do when none is given) and no member's name matches an exclude pattern.
    Raises :class:`LorsUsageError` when patterns are given and select nothing.
    """
    owners = _param_owners(model)
    shares_memory = _overlapping(p for _, p in model.named_parameters(remove_duplicate=False))

    stacks: list[Stack] = []

    def visit(path: str, module: nn.Module) -> None:
        in_stack: set[str] = set()
        for group in _candidate_groups(module):
            members = [f"{path}.{name}" if path else name for name, _ in group]
            first = group[0][1]
            stack = Stack(path=path, members=members, member_class=type(first))
            submodules = [dict(child.named_modules()) for _, child in group]
            for relname, p in first.named_parameters(remove_duplicate=False):
                if p.dim() < 2:
                    continue
                member_params = [
                    dict(child.named_parameters(remove_duplicate=False))[relname] for _, child in group
                ]
                tied = any(len(owners[id(q)]) > 1 for q in member_params)
                tied = tied or len({id(q) for q in member_params}) < len(member_params)
                tied = tied or any(id(q) in shares_memory for q in member_params)
                if tied:
                    stack.excluded[relname] = "tied or shared with another tensor"
                    continue
                owner_rel = relname.rpartition(".")[0]
                owner = submodules[0][owner_rel]
                stack.params.append(
                    StackedParam(
                        relname=relname, shape=tuple(p.shape), dtype=p.dtype, owner_class=type(owner)
                    )
                )
            stacks.append(stack)
            in_stack.update(name for name, _ in group)
        for name, child in module.named_children():
            if name not in in_stack:
                visit(f"{path}.{name}" if path else name, child)

    visit("", model)
    return select(stacks, include, exclude)


def select(stacks: list[Stack], include: list[str] | None, exclude: list[str] | None) -> list[Stack]:
    """Apply include/exclude patterns to the stacked parameters (see :func:`find_stacks`)."""
    include = [p for p in (include or []) if p]
    exclude = [p for p in (exclude or []) if p]
    if not include and not exclude:
        return stacks

    def matches(stack: Stack, relname: str, patterns: list[str]) -> bool:
        return any(fnmatch.fnmatchcase(key, pat) for key in stack.keys(relname) for pat in patterns)

    used_include: set[str] = set()
    used_exclude: set[str] = set()
    for stack in stacks:
        kept = []
        for sp in stack.params:
            if include:
                hits = [pat for pat in include if matches(stack, sp.relname, [pat])]
                used_include.update(hits)
                if not hits:
                    stack.excluded[sp.relname] = "not matched by --include"
                    continue
            hits = [pat for pat in exclude if matches(stack, sp.relname, [pat])]
            used_exclude.update(hits)
            if hits:
                stack.excluded[sp.relname] = f"excluded by {hits[0]!r}"
                continue
            kept.append(sp)
        stack.params = kept
    unused = [p for p in include if p not in used_include] + [p for p in exclude if p not in used_exclude]
    if unused:
        raise LorsUsageError(
            f"pattern {unused[0]!r} matches no stacked parameter "
            f"(patterns are matched against full parameter names such as {_example(stacks)!r})"
        )
    if not any(stack.params for stack in stacks):
        raise LorsUsageError("the include/exclude patterns leave no stacked parameter to convert")
    return [s for s in stacks if s.params]


def _example(stacks: list[Stack]) -> str:
    for stack in stacks:
        for sp in stack.params:
            return stack.keys(sp.relname)[0]
    return "layers.0.fc.weight"
