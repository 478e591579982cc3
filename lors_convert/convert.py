"""Conversion: plan which stacked parameters become LORS, decompose them, swap in LORS layers.

``plan_conversion`` is pure bookkeeping over module structure (works on the meta device);
``convert`` runs the math of :mod:`lors_convert.decompose` on the weights and installs
:mod:`lors_convert.layers` modules in place; ``install_layers`` builds the same structure from a
recorded plan (an empty skeleton for :func:`lors_convert.checkpoint.load`).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .counting import count_parameters
from .decompose import (StackFactors, as_matrix, decompose_stack, stack_matrices, dense_param_count, lors_param_count,
                        resolve_ranks, saves_parameters)
from .discovery import Stack, StackedParam, find_stacks
from .errors import LorsError, LorsUsageError
from .layers import LorsModule, layer_class, static_layer_for
from .report import MatrixReport, Report, StackReport

Groups = int | Sequence[int] | None
INITS = ("svd", "paper")


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
    def shared_key(self) -> str:
        """The checkpoint name of the shared tensor: on the first member's LORS layer."""
        return f"{self.stack.members[0]}.{self.param.owner_relpath}.shared"

    def factor_keys(self, i: int) -> dict[str, str]:
        owner = f"{self.stack.members[i]}.{self.param.owner_relpath}"
        return {"A": f"{owner}.lors_A", "B": f"{owner}.lors_B"}

    def tensor_specs(self) -> Iterator[tuple[str, tuple[int, int]]]:
        """``(checkpoint key, shape)`` of every LORS tensor of a static plan: the shared part once
        (if any), then each member's ``B (d, k)`` and ``A (k, h)``."""
        d, h = self.matrix
        if self.has_shared:
            yield self.shared_key, (d, h)
        for i, k in enumerate(self.ranks):
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
        return lors_param_count(d, h, self.ranks, self.has_shared)

    def matrix_report(self) -> MatrixReport:
        return MatrixReport(name=self.relname, kind=self.kind, layer=self.layer_kind,
                            shape=list(self.param.shape), matrix=list(self.matrix), rank=self.rank,
                            groups=list(self.groups), ranks=list(self.ranks),
                            dense_params=self.dense_params, lors_params=self.lors_params,
                            clamped=self.clamped, shared=self.has_shared)


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
            by_stack[id(stack)] = StackReport(path=stack.path, members=list(stack.members),
                                              kept_dense=dict(stack.excluded))
        matrices = [pp.matrix_report() for pp in self.params]
        for pp, m in zip(self.params, matrices):
            by_stack[id(pp.stack)].matrices.append(m)
        saved = sum(pp.dense_params - pp.lors_params for pp in self.params)
        report = Report(stacks=[r for r in by_stack.values() if r.matrices or r.kept_dense],
                        params_before=params_before, params_after=params_before - saved,
                        warnings=list(self.warnings))
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

    ``rank=None`` converts at full rank (exact). With ``require_savings`` a matrix whose
    factorization would not save parameters stays dense (and the report says so).
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
            owner = modules[f"{stack.members[0]}.{sp.owner_relpath}" if sp.owner_relpath else stack.members[0]]
            claim = adaptive(model, stack, sp) if adaptive is not None else None
            if claim is not None:
                pp = claim["plan"](stack, sp, claim)  # adaptive layers build their own plan
                params.append(pp)
                continue
            layer = static_layer_for(owner) if sp.attr == "weight" else None
            if layer is None:
                stack.excluded[sp.relname] = f"no LORS layer for {type(owner).__name__}.{sp.attr}"
                continue
            d, h = sp.shape[0], math.prod(sp.shape[1:])
            ranks, clamped = resolve_ranks(rank, groups_i, d, h)
            if require_savings and not saves_parameters(d, h, ranks):
                stack.excluded[sp.relname] = (f"rank {rank} x groups saves nothing on a {d}x{h} matrix "
                                              f"({lors_param_count(d, h, ranks)} >= "
                                              f"{dense_param_count(d, h, len(ranks))} parameters)")
                continue
            if clamped:
                warnings.append(f"{stack.path}.*.{sp.relname}: rank x groups exceeds min(d, h) = {min(d, h)}; "
                                "clamped to full rank")
            params.append(ParamPlan(stack=stack, param=sp, layer_kind=layer.layer_kind, kind="static",
                                    rank=rank, groups=groups_i, ranks=ranks, clamped=clamped))
    if not params:
        reasons = {why for s in stacks for why in s.excluded.values()}
        raise LorsError(
            f"found {len(stacks)} stack(s) but no parameter to convert: " + "; ".join(sorted(reasons)[:3])
        )
    return ConversionPlan(stacks=stacks, params=params, warnings=warnings)


def paper_init_factors(shape: tuple[int, ...], ranks: list[int], generator: torch.Generator | None = None
                       ) -> StackFactors:
    """The paper's from-scratch initialization: Kaiming-uniform ``W_s`` and ``B``, zero ``A``."""
    from .decompose import LayerFactors

    d, h = shape[0], math.prod(shape[1:])

    def kaiming(rows: int, cols: int) -> torch.Tensor:
        t = torch.empty(rows, cols)
        bound = 1.0 / math.sqrt(cols) if cols else 0.0  # kaiming_uniform_(a=sqrt(5)), as nn.Linear
        return t.uniform_(-bound, bound, generator=generator)

    shared = kaiming(d, h)
    layers = [LayerFactors(B=kaiming(d, k), A=torch.zeros(k, h), residual_energy=0.0,
                           discarded_energy=0.0, weight_norm=0.0) for k in ranks]
    return StackFactors(shared=shared, layers=layers)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def param_entry(pp: ParamPlan) -> dict:
    """The JSON record of one converted parameter (``lors_config.json`` -> stacks[].params[])."""
    return {
        "name": pp.relname, "owner": pp.param.owner_relpath, "attr": pp.param.attr,
        "layer": pp.layer_kind, "kind": pp.kind, "shape": list(pp.param.shape),
        "dtype": dtype_name(pp.param.dtype), "matrix": list(pp.matrix), "rank": pp.rank,
        "groups": list(pp.groups), "ranks": list(pp.ranks), "clamped": pp.clamped,
        "shared": list(layer_class(pp.layer_kind).shared_names) if pp.has_shared else [],
        "extra": dict(pp.extra),
    }


def plan_from_entry(stack: Stack, entry: dict) -> ParamPlan:
    """Rebuild the :class:`ParamPlan` of a recorded parameter (to build a skeleton)."""
    sp = StackedParam(relname=entry["name"], shape=tuple(entry["shape"]),
                      dtype=getattr(torch, entry["dtype"]), owner_class=nn.Module)
    cls = ParamPlan
    if entry["kind"] == "adaptive":
        from .lorsa import AdaptivePlan  # its matrix is the augmented generator (out, dq+1)

        cls = AdaptivePlan
    return cls(stack=stack, param=sp, layer_kind=entry["layer"], kind=entry["kind"],
               rank=entry["rank"], groups=list(entry["groups"]), ranks=list(entry["ranks"]),
               clamped=bool(entry.get("clamped", False)), extra=dict(entry.get("extra", {})),
               has_shared=entry["kind"] != "static" or bool(entry["shared"]))


def install_layers(model: nn.Module, pp: ParamPlan, shared: torch.Tensor | None,
                   factors: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
    """Replace the owners of ``pp`` in every member with LORS layers sharing one ``shared`` Parameter.

    ``shared`` and ``factors`` are given in the storage dtype and device (``shared`` is ignored for a
    private-only plan, ``pp.has_shared=False``); with ``factors=None`` the layers are left with empty
    factors of the right shapes (a skeleton to load a state dict into).
    """
    layer_cls = layer_class(pp.layer_kind)
    paths = [f"{member}.{pp.param.owner_relpath}" if pp.param.owner_relpath else member
             for member in pp.stack.members]
    trains = [model.get_submodule(p).get_parameter(pp.param.attr).requires_grad for p in paths]
    shared_param = nn.Parameter(shared, requires_grad=any(trains)) if pp.has_shared else None  # frozen stays frozen
    entry = param_entry(pp)
    stack = {"path": pp.stack.path, "members": list(pp.stack.members)}
    for i, path in enumerate(paths):
        dense = model.get_submodule(path)
        layer = layer_cls(dense, shared_param, total_rank=pp.ranks[i], rank=pp.rank, groups=pp.groups[i],
                          **pp.extra)
        layer.lors_A.requires_grad_(trains[i])
        layer.lors_B.requires_grad_(trains[i])
        layer.lors_entry, layer.lors_stack = entry, stack  # what save() records
        if factors is not None:
            B, A = factors[i]
            with torch.no_grad():
                layer.lors_B.copy_(B)
                layer.lors_A.copy_(A)
        model.set_submodule(path, layer)


def decompose_param(pp: ParamPlan, weights: list[torch.Tensor], report: MatrixReport | None = None,
                    init: str = "svd", method: str = "auto", device=None) -> StackFactors:
    """Factors of one planned parameter from its N layer tensors; fills the report's error columns."""
    if init == "paper":
        return paper_init_factors(pp.param.shape, pp.ranks)
    try:
        W = stack_matrices(weights, device, names=pp.keys)  # (N, d, h), checked finite
    except ValueError as e:
        raise LorsError(str(e)) from None
    factors = decompose_stack(W, pp.ranks, method=method)
    if report is not None:
        report.relative_error = [f.relative_error for f in factors.layers]
        report.retained_energy = [f.retained_energy for f in factors.layers]
    return factors


def convert_tensors(plan: ConversionPlan, get_tensor: Callable[[str], torch.Tensor],
                    matrices: list[MatrixReport], init: str = "svd", method: str = "auto", device=None,
                    progress=None) -> Iterator[tuple[str, torch.Tensor]]:
    """The LORS tensors of a plan (shared once, then each member's factors), without any module.

    The weights-only path: TorchScript sources and checkpoints streamed one group at a time.
    Yields ``(checkpoint key, tensor in the source dtype on the CPU)``.
    """
    steps = iter(zip(plan.params, matrices))
    if progress is not None:
        steps = progress(steps, len(plan.params), "decomposing")
    for pp, m in steps:
        if pp.kind != "static":
            raise LorsError(f"{pp.relname}: adaptive layers need the in-memory path")
        weights = [get_tensor(key) for key in pp.keys]
        factors = decompose_param(pp, weights, m, init=init, method=method, device=device)
        yield from factor_tensors(pp, factors, weights[0].dtype)


def factor_tensors(pp: ParamPlan, factors: StackFactors, dtype: torch.dtype
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """``(checkpoint key, tensor)`` of a static plan's factors, in the order of :meth:`ParamPlan.tensor_specs`
    (CPU, ``dtype``)."""
    tensors = [factors.shared] if pp.has_shared else []
    for f in factors.layers:
        tensors += [f.B, f.A]
    for (key, _), t in zip(pp.tensor_specs(), tensors, strict=True):
        yield key, t.to(device="cpu", dtype=dtype)


def build_skeleton(model: nn.Module, plan: ConversionPlan) -> nn.Module:
    """Install empty LORS layers for ``plan`` in ``model`` (in place) and return it.

    The result has the structure :func:`convert` gives with the same settings (one shared Parameter
    per stacked matrix, factors of the planned ranks) but uninitialized values: load a converted
    model's ``state_dict()`` into it. ``plan`` comes from :func:`plan_conversion` on this model.
    """
    for pp in plan.params:
        if pp.kind != "static":
            raise LorsError(f"build_skeleton handles static LORS only, not {pp.kind} ({pp.relname})")
        weight = model.get_parameter(pp.keys[0])
        install_layers(model, pp, torch.empty(pp.matrix, dtype=weight.dtype, device=weight.device)
                       if pp.has_shared else None)
    return model


def iter_weights(model: nn.Module, pp: ParamPlan) -> list[torch.Tensor]:
    return [model.get_parameter(key).detach() for key in pp.keys]


def convert(
    model: nn.Module,
    rank: int | None = 8,
    groups: Groups = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    init: str = "svd",
    method: str = "auto",
    device: str | torch.device | None = None,
    require_savings: bool = True,
    progress: Callable[[Iterator, int, str], Iterator] | None = None,
    adaptive=None,
    calibration=None,
    refine: int = 0,
    budget: float | None = None,
    sharing: str = "auto",
) -> tuple[nn.Module, Report]:
    """Convert ``model`` **in place** to LORS and return it with the savings report.

    ``rank`` is ``r`` per group (``None``: full rank, exact); ``groups`` is ``K`` for every layer or
    one ``K_i`` per layer of each stack (e.g. ``[1, 1, 2, 2, 3, 3]``); ``include``/``exclude`` are
    fnmatch patterns over full parameter names. ``init="svd"`` fits the trained weights (mean +
    truncated SVD); ``init="paper"`` is the paper's from-scratch init. ``method`` picks the SVD
    ("exact", "randomized", "auto"); ``device`` runs the math elsewhere (e.g. "cuda").
    ``adaptive`` selects parameter generators for LORSA: ``"auto"`` (torch.fx detection), a spec
    ``"PATTERN: G x [RxC, ...]"``, a :class:`lors_convert.lorsa.GeneratorSpec` or a list of them
    (see :mod:`lors_convert.lorsa`).

    Calibrated conversion (see :mod:`lors_convert.calibrated`): ``calibration`` maps weight keys to
    input Gram matrices (a :class:`lors_convert.calibration.Calibration` from ``collect_grams``, which
    by default also holds output-gradient Grams: then the model output's error is minimized);
    the shared part becomes the weighted least-squares fit and the private parts the whitened
    truncated SVD. ``refine`` alternating sweeps re-fit the shared part given the private
    parts. ``budget`` (a fraction of the stacked parameters, e.g. 0.4) replaces ``rank``/``groups``
    by per-layer ranks from greedy water-filling; matrices that do not break even stay dense, and
    with ``sharing="auto"`` a matrix whose layers share too little to pay for ``W_s`` becomes
    private-only (``W_i = B_i A_i``); ``sharing="always"`` keeps a shared part everywhere, ``"never"``
    none (per-layer low rank).
    """
    if init not in INITS:
        raise LorsUsageError(f"init must be one of {INITS}, got {init!r}")
    if method not in ("auto", "exact", "randomized"):
        raise LorsUsageError(f"method must be auto, exact or randomized, got {method!r}")
    from .calibrated import SHARING

    if sharing not in SHARING:
        raise LorsUsageError(f"sharing must be one of {', '.join(SHARING)}, got {sharing!r}")
    params_before = count_parameters(model)
    calibrated = calibration is not None or refine > 0 or budget is not None
    if calibrated and init != "svd":
        raise LorsUsageError("calibration, refine and budget apply to init='svd' only")
    hook = None
    if adaptive is not None:
        from .lorsa import check_specs_used, make_adaptive_hook

        hook = make_adaptive_hook(adaptive, rank, groups)
    shared_parts: dict[str, torch.Tensor] = {}  # solved once for the budget, reused below
    if budget is not None:
        from .calibrated import apply_budget

        plan = plan_conversion(model, None, None, include, exclude, require_savings=False, adaptive=hook)
        allocation = apply_budget(plan, model, budget, calibration, device=device, shared_parts=shared_parts,
                                  sharing=sharing)
    else:
        plan = plan_conversion(model, rank, groups, include, exclude, require_savings, adaptive=hook)
    if hook is not None:
        check_specs_used(hook)
    report, matrices = plan.report_with_matrices(params_before)
    steps = iter(zip(plan.params, matrices))
    weighted: list = []  # calibrated: (weighted errors, output energies, refine history) per parameter
    if progress is not None:
        steps = progress(steps, len(plan.params), "decomposing")
    for pp, m in steps:
        if pp.kind == "adaptive":  # LORSA: generator Linears (lors_convert.lorsa)
            from .lorsa import convert_generator

            fit = convert_generator(model, pp, init=init, device=device)
            m.relative_error, m.retained_energy = fit.relative_error, fit.retained_energy
            continue
        weights = iter_weights(model, pp)
        if calibrated and pp.kind == "static" and init == "svd":
            from .calibrated import decompose_param as calibrated_decompose

            factors = calibrated_decompose(pp, weights, calibration, refine, device=device,
                                           shared=shared_parts.pop(pp.shared_key, None))
            weighted.append((factors.weighted_error, factors.weighted_output, factors.history))
            m.relative_error = [f.relative_error for f in factors.layers]
            m.retained_energy = [f.retained_energy for f in factors.layers]
        else:
            factors = decompose_param(pp, weights, m, init=init, method=method, device=device)
        dtype, where = weights[0].dtype, weights[0].device
        install_layers(model, pp, factors.shared.to(device=where, dtype=dtype) if pp.has_shared else None,
                       [(f.B.to(device=where, dtype=dtype), f.A.to(device=where, dtype=dtype))
                        for f in factors.layers])
    report.params_after = count_parameters(model)
    static = [pp for pp in plan.params if pp.kind == "static"]
    if refine > 0 and static and not any(pp.has_shared for pp in static):
        report.warnings.append(f"refine={refine} had nothing to refine: every converted matrix is private-only "
                               "(no shared part)")
    if calibrated:
        from .calibrated import quality_summary
        report.quality.update(quality_summary(weighted, calibration, refine,
                                              budget, allocation if budget is not None else None, report))
    return model, report


def merge(model: nn.Module) -> nn.Module:
    """Replace every LORS module of ``model`` (in place) by a dense module of its original class.

    The result has the original module types and state-dict keys, shapes and dtypes.
    """
    replacements = [(name, m) for name, m in model.named_modules() if isinstance(m, LorsModule)]
    if isinstance(model, LorsModule):
        return model.to_dense()
    for name, layer in replacements:
        model.set_submodule(name, layer.to_dense())
    return model


def lors_modules(model: nn.Module) -> Iterator[tuple[str, LorsModule]]:
    for name, m in model.named_modules():
        if isinstance(m, LorsModule):
            yield name, m


__all__ = ["convert", "merge", "plan_conversion", "install_layers", "build_skeleton", "ConversionPlan", "ParamPlan",
           "paper_init_factors", "as_matrix"]
