"""Conversion plans: which stacked parameters become LORS, at what rank, and their config records.

Pure bookkeeping over module structure (works on the meta device, touches no weights):
:func:`plan_conversion` turns the stacks :func:`find_stacks` finds into one :class:`ParamPlan` per
stacked parameter (an :class:`AdaptivePlan` for a parameter generator, LORSA). A plan knows its
checkpoint tensor names and its parameter counts (its ``lors_config.json`` record is
:func:`lors_convert.checkpoint.format.param_entry`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

from torch import nn

from ..decompose.lorst import dense_param_count, lors_param_count, resolve_ranks, saves_parameters
from ..errors import LorsError, LorsUsageError
from ..layers import static_layer_for
from ..layers.adaptive import Layout, LorsaLinear, group_ranks, private_param_count
from ..report import MatrixReport, Report, StackReport
from .stacks import Stack, StackedParam, find_stacks

Groups = int | Sequence[int] | None


@dataclass
class ParamPlan:
    """How one stacked parameter is converted."""

    stack: Stack
    param: StackedParam
    layer_kind: str  # "linear", "conv2d", "conv1d", "generator"
    kind: str  # "static" or "adaptive"
    rank: int | None  # r; None = full rank
    groups: list[int]  # K_i per layer
    ranks: list[int]  # total private rank per layer (clamped)
    clamped: bool = False
    extra: dict = field(default_factory=dict)  # layer-specific settings (adaptive layout, ...)
    has_shared: bool = True  # False: a private-only stack, W_i = B_i A_i (a rank budget's choice)
    dense_members: list[int] = field(default_factory=list)  # members kept dense (exact) inside the stack

    @property
    def relname(self) -> str:
        return self.param.relname

    @property
    def matrix(self) -> tuple[int, int]:
        shape = self.param.shape
        return shape[0], math.prod(shape[1:])

    @property
    def keys(self) -> list[str]:
        return self.stack.keys(self.relname)

    @property
    def lors_members(self) -> list[int]:
        """Indices of the members that become LORS layers (all but ``dense_members``)."""
        return [i for i in range(len(self.stack.members)) if i not in self.dense_members]

    @property
    def converted_keys(self) -> list[str]:
        """The weight keys replaced by LORS tensors (a dense member's stays as it is)."""
        return [self.keys[i] for i in self.lors_members]

    @property
    def shared_key(self) -> str:
        """The checkpoint name of the shared tensor: on the first LORS member's layer."""
        return f"{self.stack.members[self.lors_members[0]]}.{self.param.owner_relpath}.shared"

    def lors_view(self) -> ParamPlan:
        """This plan restricted to its LORS members (what a fit sees: dense members take no part)."""
        keep = self.lors_members
        stack = replace(self.stack, members=[self.stack.members[i] for i in keep])
        return replace(
            self,
            stack=stack,
            groups=[self.groups[i] for i in keep],
            ranks=[self.ranks[i] for i in keep],
            dense_members=[],
        )

    def factor_keys(self, i: int) -> dict[str, str]:
        owner = f"{self.stack.members[i]}.{self.param.owner_relpath}"
        return {"A": f"{owner}.lors_A", "B": f"{owner}.lors_B"}

    def tensor_specs(self) -> Iterator[tuple[str, tuple[int, int]]]:
        """``(checkpoint key, shape)`` of every LORS tensor of a static plan: the shared part once
        (if any), then each member's ``B (d, k)`` and ``A (k, h)``."""
        d, h = self.matrix
        if self.has_shared:
            yield self.shared_key, (d, h)
        for i in self.lors_members:
            k = self.ranks[i]
            keys = self.factor_keys(i)
            yield keys["B"], (d, k)
            yield keys["A"], (k, h)

    @property
    def dense_params(self) -> int:
        d, h = self.matrix
        return dense_param_count(d, h, len(self.ranks))

    @property
    def lors_params(self) -> int:
        d, h = self.matrix
        ranks = [self.ranks[i] for i in self.lors_members]
        return lors_param_count(d, h, ranks, self.has_shared) + d * h * len(self.dense_members)

    def matrix_report(self) -> MatrixReport:
        return MatrixReport(
            name=self.relname,
            kind=self.kind,
            layer=self.layer_kind,
            shape=list(self.param.shape),
            matrix=list(self.matrix),
            rank=self.rank,
            groups=list(self.groups),
            ranks=list(self.ranks),
            dense_params=self.dense_params,
            lors_params=self.lors_params,
            clamped=self.clamped,
            shared=self.has_shared,
            dense_members=list(self.dense_members),
        )


@dataclass
class ConversionPlan:
    stacks: list[Stack]
    params: list[ParamPlan]
    warnings: list[str] = field(default_factory=list)

    def report(self, params_before: int) -> Report:
        """The projected report (no errors measured yet)."""
        return self.report_with_matrices(params_before)[0]

    def report_with_matrices(self, params_before: int) -> tuple[Report, list[MatrixReport]]:
        """The projected report and its matrix entries in the order of ``self.params``."""
        by_stack: dict[int, StackReport] = {}
        for stack in self.stacks:
            by_stack[id(stack)] = StackReport(
                path=stack.path,
                members=list(stack.members),
                kept_dense=dict(stack.excluded),
                kept_dense_params={
                    sp.relname: len(stack) * math.prod(sp.shape)
                    for sp in stack.params
                    if sp.relname in stack.excluded
                },
            )
        matrices = [pp.matrix_report() for pp in self.params]
        for pp, m in zip(self.params, matrices, strict=False):
            by_stack[id(pp.stack)].matrices.append(m)
        saved = sum(pp.dense_params - pp.lors_params for pp in self.params)
        report = Report(
            stacks=[r for r in by_stack.values() if r.matrices or r.kept_dense],
            params_before=params_before,
            params_after=params_before - saved,
            warnings=list(self.warnings),
        )
        return report, matrices


def resolve_groups(groups: Groups, stack: Stack) -> list[int]:
    if groups is None:
        return [1] * len(stack)
    if isinstance(groups, int):
        values = [groups] * len(stack)
    else:
        values = [int(g) for g in groups]
        if len(values) != len(stack):
            raise LorsUsageError(
                f"groups has {len(values)} entries but stack {stack.path or '<root>'!r} has "
                f"{len(stack)} layers ({stack.members[0]} ..): give one entry per layer or a single number"
            )
    if any(g < 1 for g in values):
        raise LorsUsageError(f"groups must be >= 1, got {values}")
    return values


def check_rank(rank: int | None) -> None:
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise LorsUsageError(f"rank must be a positive integer or 'full', got {rank!r}")


def plan_conversion(
    model: nn.Module,
    rank: int | None = 8,
    groups: Groups = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    require_savings: bool = True,
    adaptive: Callable[[nn.Module, Stack, StackedParam], dict | None] | None = None,
) -> ConversionPlan:
    """Decide, without touching weights, which stacked parameters become LORS and at what rank.

    ``rank=None`` converts every matrix at full rank (exact, whatever ``require_savings``;
    :func:`full_rank_note` says what it costs). With ``require_savings`` a matrix whose
    factorization at ``rank`` would not save parameters stays dense (and the report says so).
    ``adaptive(model, stack, param)`` may claim a parameter as a generator: it returns the LORSA
    settings (``rank``, ``groups``, layout) or None.
    """
    check_rank(rank)
    stacks = find_stacks(model, include, exclude)
    if not stacks:
        n_modules = sum(1 for _ in model.modules())
        raise LorsError(
            f"no stacks found: searched {n_modules} modules for >= 2 sibling submodules with equal class "
            "and parameter/buffer names, shapes and dtypes (holding a >= 2-D parameter)"
        )
    params: list[ParamPlan] = []
    warnings: list[str] = []
    modules = dict(model.named_modules())  # get_submodule does not work on TorchScript modules
    for stack in stacks:
        groups_i = resolve_groups(groups, stack)
        for sp in list(stack.params):
            if not sp.dtype.is_floating_point:
                stack.excluded[sp.relname] = f"dtype {sp.dtype} is not floating point"
                continue
            owner = modules[
                f"{stack.members[0]}.{sp.owner_relpath}" if sp.owner_relpath else stack.members[0]
            ]
            claim = adaptive(model, stack, sp) if adaptive is not None else None
            if claim is not None:
                params.append(adaptive_plan(stack, sp, claim))
                continue
            layer = static_layer_for(owner) if sp.attr == "weight" else None
            if layer is None:
                stack.excluded[sp.relname] = f"no LORS layer for {type(owner).__name__}.{sp.attr}"
                continue
            d, h = sp.shape[0], math.prod(sp.shape[1:])
            ranks, clamped = resolve_ranks(rank, groups_i, d, h)
            if require_savings and rank is not None and not saves_parameters(d, h, ranks):
                stack.excluded[sp.relname] = (
                    f"rank {rank} x groups saves nothing on a {d}x{h} matrix "
                    f"({lors_param_count(d, h, ranks)} >= "
                    f"{dense_param_count(d, h, len(ranks))} parameters)"
                )
                continue
            if clamped:
                warnings.append(
                    f"{stack.path}.*.{sp.relname}: rank x groups exceeds min(d, h) = {min(d, h)}; "
                    "clamped to full rank"
                )
            params.append(
                ParamPlan(
                    stack=stack,
                    param=sp,
                    layer_kind=layer.layer_kind,
                    kind="static",
                    rank=rank,
                    groups=groups_i,
                    ranks=ranks,
                    clamped=clamped,
                )
            )
    if not params:
        reasons = {why for s in stacks for why in s.excluded.values()}
        raise LorsError(
            f"found {len(stacks)} stack(s) but no parameter to convert: " + "; ".join(sorted(reasons)[:3])
        )
    return ConversionPlan(stacks=stacks, params=params, warnings=warnings)


def full_rank_note(params: list[ParamPlan]) -> str:
    """What a full-rank conversion costs: it is exact, and it saves nothing."""
    static = [pp for pp in params if pp.kind == "static"]
    lors, dense = sum(pp.lors_params for pp in static), sum(pp.dense_params for pp in static)
    return (
        f"rank full is an exact conversion and saves nothing: the converted matrices take {lors} "
        f"parameters instead of {dense} dense"
    )


class AdaptivePlan(ParamPlan):
    """A generator's plan (``kind="adaptive"``). ``matrix`` is the augmented weight ``(out, dq+1)``
    (the shared tensor's shape); ``extra`` holds ``layout`` (string), ``has_bias`` and ``sweeps``.
    A loader rebuilding plans from ``lors_config.json`` should build this class for adaptive entries.
    """

    @property
    def layout(self) -> Layout:
        return Layout.parse(self.extra["layout"])

    @property
    def has_bias(self) -> bool:
        return bool(self.extra.get("has_bias", True))

    @property
    def matrix(self) -> tuple[int, int]:
        return self.param.shape[0], self.param.shape[1] + (1 if self.has_bias else 0)

    def factor_keys(self, i: int) -> dict[str, str]:
        owner = f"{self.stack.members[i]}.{self.param.owner_relpath}"
        keys = {}
        for m in range(len(self.layout.entries)):
            keys[f"B.{m}"] = f"{owner}.lors_B.{m}"
            keys[f"A.{m}"] = f"{owner}.lors_A.{m}"
            keys[f"E.{m}.weight"] = f"{owner}.lors_E.{m}.weight"
            if self.has_bias:
                keys[f"E.{m}.bias"] = f"{owner}.lors_E.{m}.bias"
        return keys

    @property
    def bias_keys(self) -> list[str] | None:
        """The generators' bias keys (absorbed as the last input column), None without bias."""
        if not self.has_bias:
            return None
        return [
            f"{m}.{self.param.owner_relpath}.bias" if self.param.owner_relpath else f"{m}.bias"
            for m in self.stack.members
        ]

    @property
    def dense_params(self) -> int:  # weight and bias of every layer: both are absorbed
        d, h = self.matrix
        return dense_param_count(d, h, len(self.groups))

    @property
    def lors_params(self) -> int:
        d, h = self.matrix
        dq = self.param.shape[1]
        return d * h + sum(
            private_param_count(self.layout, dq, self.rank, k, self.has_bias) for k in self.groups
        )


def adaptive_plan(stack: Stack, sp: StackedParam, claim: dict) -> AdaptivePlan:
    rank, layout = claim["rank"], claim["layout"]
    groups = [1] * len(stack) if rank is None else resolve_groups(claim["groups"], stack)
    ranks = [sum(K * r1 for K, r1, _ in group_ranks(layout, rank, k)) for k in groups]
    clamped = rank is not None and any(
        K * r1 > r or K * r2 > c
        for k in groups
        for (K, r1, r2), (r, c) in zip(group_ranks(layout, rank, k), layout.entries, strict=False)
    )
    extra = {"layout": str(layout), "has_bias": claim["has_bias"], "sweeps": claim["sweeps"]}
    return AdaptivePlan(
        stack=stack,
        param=sp,
        layer_kind=LorsaLinear.layer_kind,
        kind="adaptive",
        rank=rank,
        groups=groups,
        ranks=ranks,
        clamped=clamped,
        extra=extra,
    )
