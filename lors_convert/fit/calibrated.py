"""Calibrated fits: a conversion plan meets the weighted math (:mod:`~lors_convert.decompose.whiten`,
:mod:`~lors_convert.decompose.budget`).

``convert(..., calibration=, refine=, budget=)`` calls these; they know about :class:`ParamPlan`
(keys, layer kind) and read weights through a getter, nothing else of the model.

Objective. With output Grams in the calibration (``Calibration.out_grams``,
:mod:`lors_convert.calibrate.sensitivity`,
the default of ``collect_grams``) the error of every matrix is the model output's error it causes,
to first order (K-FAC), ``tr(G_i D_i C_i D_i^T)``: one unit for all matrices, so the global budget
compares a query projection with an FFN matrix directly. Without them (``objective="layer"``, or a
plain mapping of input Grams) the error is the layer's own output error on the calibration inputs
relative to its dense output energy, ``||(W_i - What_i) X_i||^2 / ||W_i X_i||^2`` (each layer's
Gram scaled by ``1 / tr(W_i C_i W_i^T)``), summed over layers and matrices (shared solve and global
budget alike): absolute output errors are in each matrix's own units, and a budget over them
starves the matrices with small activations (docs/calibration.md). ``CONVERSION_DAMP`` adds a ridge
of ``CONVERSION_DAMP * mean eigenvalue`` to every Gram (docs/calibration.md).
Without a Gram (no calibration, or a layer the data never reached) the identity is used, i.e. the
plain Frobenius error; uncalibrated, unrefined conversions keep the plain mean as shared part.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from ..decompose.budget import Allocation, BudgetItem, allocate_ranks, allocate_with_sharing
from ..decompose.lorst import as_matrix
from ..decompose.stack import orient
from ..decompose.weighted import decompose_weighted, truncated, weighted_basis
from ..decompose.whiten import shared_and_spectra, sharing_spectra
from ..decompose.whitener import DEFAULT_FLOOR, ScaledGram
from ..errors import LorsError, LorsUsageError
from ..heap import trim
from ..io.memory import KeptResults
from .result import Fit

# the ridge a calibrated conversion adds to every Gram, relative to its mean eigenvalue (the pure
# math's default, decompose.whitener.EXACT_DAMP, adds none)
CONVERSION_DAMP = 0.1


def orientation(pp) -> str:
    """HF Conv1D stores ``(in, out)``; everything else multiplies inputs from the right of ``(out, in)``."""
    return "in_out" if pp.layer_kind == "conv1d" else "out_in"


def _grams_of(calibration) -> Mapping[str, torch.Tensor] | None:
    if calibration is None:
        return None
    return getattr(calibration, "grams", calibration)


def _out_grams_of(calibration) -> Mapping[str, torch.Tensor]:
    """Output-side Grams (:mod:`lors_convert.calibrate.sensitivity`), empty for a plain mapping of input Grams."""
    return getattr(calibration, "out_grams", None) or {}


def output_grams(pp, weights: list[torch.Tensor], calibration) -> list[ScaledGram] | None:
    """Per layer output-side Gram in linear orientation, or None for the layer objective.

    None unless every layer of the stack has one: a mix would add errors in different units.
    """
    grams = _out_grams_of(calibration)
    if not grams or not all(key in grams for key in pp.keys):
        return None
    d, h = as_matrix(weights[0]).shape
    m = h if orientation(pp) == "in_out" else d  # the output width in linear orientation
    return [output_gram(calibration, key, m) for key in pp.keys]


def output_gram(calibration, key: str, m: int) -> ScaledGram | None:
    """The output-side Gram ``(m, m)`` of weight ``key`` (read from disk when spilled), or None."""
    grams = _out_grams_of(calibration)
    if key not in grams:
        return None
    stored = _stored(calibration, key, m, "output Gram", output=True)
    if stored is not None:
        return ScaledGram(None, load=stored[0], factor=stored[1], size=m)
    return ScaledGram(_checked_gram(grams[key], key, m, "output Gram"))


def _stored(calibration, key: str, n: int, what: str, output: bool = False):
    """``(load, factor)``: the readers of the Gram a spilled calibration keeps on disk for ``key`` and
    of its Cholesky factor (:class:`~lors_convert.decompose.whitener.ScaledGram`), or None when it
    keeps Grams in memory."""
    stored = calibration.stored(key, output=output) if hasattr(calibration, "stored") else None
    if stored is None:
        return None
    size, load, factor = stored
    if size != n:
        raise LorsError(f"{what} for {key!r} is ({size}, {size}), expected ({n}, {n})")
    return load, factor


def _checked_gram(C: torch.Tensor, key: str, n: int, what: str) -> torch.Tensor:
    """``C`` as a float64 CPU tensor (the same object when it already is one), shape ``(n, n)``."""
    if C.dtype != torch.float64 or C.device.type != "cpu":
        C = C.to(torch.float64).cpu()
    if tuple(C.shape) != (n, n):
        raise LorsError(f"{what} for {key!r} is {tuple(C.shape)}, expected ({n}, {n})")
    return C


def layer_objective(pp, calibration) -> bool:
    """Whether ``pp``'s error is each layer's own output error (input Grams, no output-gradient Grams
    for every layer): then it is made relative to the layer's dense output energy."""
    out = _out_grams_of(calibration)
    return _grams_of(calibration) is not None and not (out and all(key in out for key in pp.keys))


def layer_grams(pp, weights: list[torch.Tensor], calibration) -> tuple[list[torch.Tensor], list[str]]:
    """Per layer Gram in linear orientation (identity where missing); under the layer objective
    scaled by ``1 / tr(W_i C_i W_i^T)``, so that every error is relative to its layer's output.

    Returns the Grams and the keys that had none.
    """
    normalize = layer_objective(pp, calibration)
    grams = _grams_of(calibration)
    orient = orientation(pp)
    out, missing = [], []
    for key, w in zip(pp.keys, weights, strict=False):
        d, h = as_matrix(w).shape  # a view: no copy
        n = d if orient == "in_out" else h  # the input width in linear orientation
        stored = (
            _stored(calibration, key, n, "calibration Gram") if grams is not None and key in grams else None
        )
        C = None
        if stored is None:
            C = grams.get(key) if grams is not None else None
            if C is None:
                missing.append(key)
                C = torch.eye(n, dtype=torch.float64)
            else:
                C = _checked_gram(C, key, n, "calibration Gram")
        scale = 1.0
        if normalize:
            M = as_matrix(w).to(torch.float64)
            M = M.T if orient == "in_out" else M  # (out, in)
            C_i = C if stored is None else stored[0]().to(M.dtype)
            energy = float(((M @ C_i) * M).sum())  # tr(W C W^T)
            if energy > 0 and math.isfinite(energy):
                scale = 1.0 / energy
        load, factor = (None, None) if stored is None else stored
        out.append(ScaledGram(C, scale, load=load, factor=factor, size=None if stored is None else n))
    return out, missing


def floor_and_damp(floor: float | None, damp: float | None) -> tuple[float, float]:
    """The eigenvalue floor and damping of a conversion's Grams (None: the defaults)."""
    return (DEFAULT_FLOOR if floor is None else floor), (CONVERSION_DAMP if damp is None else damp)


FIT_MEMO_BYTES = 1 << 30  # fits kept by a :class:`SearchMemo` (MiniLM's whole stack: 0.2 GB)


@dataclass
class SearchMemo:
    """What conversions of the same weights and calibration at several budgets share (``--target``):
    each parameter's budget spectra and screening shared part (``budget``, see :func:`apply_budget`),
    and its weighted fit up to the truncation (``fits``, a
    :class:`~lors_convert.decompose.whiten.WeightedBasis` per parameter and structure, kept while they
    fit in ``FIT_MEMO_BYTES``). Each candidate then costs its truncation and its measurement."""

    budget: dict = field(default_factory=dict)
    fits: KeptResults = field(default_factory=lambda: KeptResults(FIT_MEMO_BYTES))


def fit_calibrated(
    pp,
    weights: list[torch.Tensor],
    calibration=None,
    refine: int = 0,
    device=None,
    shared: torch.Tensor | None = None,
    floor: float | None = None,
    damp: float | None = None,
    memo: SearchMemo | None = None,
    deferred: bool = False,
) -> Fit:
    """The weighted fit of one planned parameter. Uncalibrated and unrefined: the plain mean + SVD.

    ``shared``: the initial shared part already solved for (:func:`apply_budget`'s ``shared_parts``, a
    screening solve that the fit finishes). ``memo``: keeps the unrefined fit's rank-independent part
    for the next conversion at another budget (the same factors as without it, bit for bit).
    ``deferred``: the private factors come from a later pass (the closed loop refits every one of
    them): only the shared part is solved, the factors are zeros of the planned ranks and the fit
    carries no error figures (the pass that writes the factors measures them).
    """
    floor, damp = floor_and_damp(floor, damp)
    weights = list(weights)
    grams, _ = layer_grams(pp, weights, calibration)
    screened = shared is not None  # the budget's solve: finished in the fit
    if shared is None and calibration is None and refine == 0:
        shared = _plain_mean(weights)
    args = dict(
        weights=weights,
        grams=grams,
        orientation=orientation(pp),
        floor=floor,
        damp=damp,
        device=device,
        shared=shared,
        shared_part=pp.has_shared,
        out_grams=output_grams(pp, weights, calibration),
        screened=screened,
    )
    if deferred:
        return _deferred_fit(pp, args)
    if memo is not None and refine == 0:
        key = (tuple(pp.keys), pp.has_shared)  # the shared start is the memo's too
        factors = truncated(memo.fits.get(key, lambda: weighted_basis(**args)), pp.ranks)
    else:
        factors = decompose_weighted(ranks=pp.ranks, refine=refine, **args)
    return Fit(
        shared=factors.shared if pp.has_shared else None,
        factors=[(f.B, f.A) for f in factors.layers],
        relative_error=[f.relative_error for f in factors.layers],
        retained_energy=[f.retained_energy for f in factors.layers],
        weighted=(factors.weighted_error, factors.weighted_output, factors.history),
    )


def _deferred_fit(pp, args: dict) -> Fit:
    """The shared part alone (:func:`fit_calibrated` with ``deferred``) and zero private factors."""
    shared = None
    if args["shared_part"]:
        basis = weighted_basis(**args, layer_svds=False)
        shared = orient(basis.W_s, basis.orientation).float()
    d, h = pp.matrix
    zeros = [(torch.zeros(d, k), torch.zeros(k, h)) for k in pp.ranks]  # (d, k), (k, h)
    return Fit(shared=shared, factors=zeros)


def _plain_mean(weights: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([as_matrix(w).to(torch.float64) for w in weights]).mean(0)


def apply_budget(
    plan,
    get: Callable[[str], torch.Tensor],
    budget: float,
    calibration=None,
    device=None,
    floor: float | None = None,
    damp: float | None = None,
    shared_parts: dict[str, torch.Tensor] | None = None,
    sharing: str = "auto",
    memo: SearchMemo | None = None,
) -> Allocation:
    """Choose per-layer ranks for the static parameters of ``plan`` under ``budget`` (in place).

    ``budget`` is the target fraction of the stacked parameters of the plan (adaptive parameters
    keep their planned cost, which counts against the budget). Parameters that do not break even
    leave the plan and stay dense (recorded in their stack's ``excluded``). ``sharing="auto"`` also
    decides per parameter whether a shared part pays for itself (``pp.has_shared``, see
    :func:`lors_convert.decompose.budget.allocate_with_sharing`); ``"always"`` keeps the LORS structure,
    ``"never"`` makes every parameter private-only (per-layer low rank). Both values were checked by
    :class:`~lors_convert.options.ConvertOptions`.
    ``get(key)`` reads a layer weight. ``shared_parts``: a dict that receives each kept shared part
    (``pp.shared_key`` -> tensor), solved for the spectra (a screening solve,
    :data:`~lors_convert.decompose.whiten.CG_SCREEN_ITER` iterations), so that :func:`fit_calibrated`
    continues from it instead of solving again.
    ``memo``: keeps each parameter's spectra and shared part across calls on the same weights and
    calibration (they do not depend on the budget: ``--target`` tries several budgets and solves
    them once); None keeps nothing (one stack's work in memory at a time).
    """
    floor, damp = floor_and_damp(floor, damp)
    static = [pp for pp in plan.params if pp.kind == "static"]
    fixed = sum(pp.lors_params for pp in plan.params if pp.kind != "static")
    total = sum(pp.dense_params for pp in plan.params)
    items, private = [], []
    for pp in static:
        shared, item, alone = _memoized_items(
            memo, pp, get, calibration, sharing, dict(floor=floor, damp=damp, device=device)
        )
        if shared_parts is not None and shared is not None:
            shared_parts[pp.shared_key] = shared
        if item is not None:
            items.append(item)
        if alone is not None:
            private.append(alone)
        shared = item = alone = None  # this stack's work, freed before the trim
        trim()
    alloc, choice = _allocate(items, private, int(round(budget * total)) - fixed, sharing)
    _apply_allocation(plan, static, alloc, choice, shared_parts)
    if not plan.params:
        raise LorsUsageError(f"budget {budget} keeps every stacked parameter dense: nothing to convert")
    return alloc


def _memoized_items(memo: SearchMemo | None, pp, get, calibration, sharing: str, opts: dict):
    """:func:`_budget_items`, kept in ``memo`` (by the parameter's weight keys and the sharing
    choice) when given; each call gets its own copy of the shared part, which the fit continues from."""
    key = (tuple(pp.keys), sharing)
    if memo is None or key not in memo.budget:
        items = _budget_items(pp, get, calibration, sharing, opts)
        if memo is None:
            return items
        memo.budget[key] = items
    shared, item, alone = memo.budget[key]
    return (None if shared is None else shared.clone()), item, alone


def _budget_items(pp, get, calibration, sharing: str, opts: dict):
    """One static parameter's spectra for the allocator: ``(shared part solved for or None, its
    shared-structure item or None, its private-only item or None)``, as ``sharing`` asks."""
    if any(g != 1 for g in pp.groups):
        raise LorsUsageError("--budget chooses one rank per layer; it does not combine with groups")
    weights = [get(k) for k in pp.keys]
    grams, _ = layer_grams(pp, weights, calibration)
    opts = dict(opts, orientation=orientation(pp), out_grams=output_grams(pp, weights, calibration))
    plain = _plain_mean(weights) if calibration is None else None
    spectra = alone = None
    if sharing == "auto":  # both structures: residual spectra and the layers' own
        shared, spectra, alone = sharing_spectra(weights, grams, shared_matrix=plain, **opts)
    elif sharing == "always":
        shared, spectra = shared_and_spectra(weights, grams, shared_matrix=plain, **opts)
    else:  # never: no shared part to solve for
        shared, alone = shared_and_spectra(weights, grams, shared=False, **opts)
    d, h = pp.matrix
    item = (
        None
        if spectra is None
        else BudgetItem(d=d, h=h, spectra=[s.tolist() for s in spectra], name=pp.relname)
    )
    private = (
        None
        if alone is None
        else BudgetItem(d=d, h=h, spectra=[s.tolist() for s in alone], shared=False, name=pp.relname)
    )
    return shared, item, private


def _allocate(items: list, private: list, limit: int, sharing: str) -> tuple[Allocation, list[bool]]:
    """The allocation under ``limit`` parameters, and per parameter whether it keeps a shared part."""
    if sharing == "auto":
        choice, alloc = allocate_with_sharing(items, private, limit, fraction=False)
    elif sharing == "never":
        choice, alloc = [False] * len(private), allocate_ranks(private, limit, fraction=False)
    else:
        choice, alloc = [True] * len(items), allocate_ranks(items, limit, fraction=False)
    return alloc, choice


def _apply_allocation(plan, static: list, alloc: Allocation, choice: list[bool], shared_parts) -> None:
    """Write the allocated ranks into the plans; a parameter kept dense leaves ``plan.params``."""
    kept = []
    for pp, ranks, dense, has_shared, dense_layers in zip(
        static, alloc.ranks, alloc.dense, choice, alloc.dense_layers, strict=False
    ):
        pp.has_shared = has_shared
        shared = shared_parts.pop(pp.shared_key, None) if shared_parts is not None else None
        if dense:
            pp.stack.excluded[pp.relname] = "the budget keeps it dense (a factorization would not break even)"
            continue
        pp.dense_members = [i for i, dn in enumerate(dense_layers) if dn]  # a rank would cost more than W_i
        pp.ranks = list(ranks)
        pp.rank = max(ranks[i] for i in pp.lors_members)
        pp.groups = [1] * len(ranks)
        pp.clamped = False
        if shared is not None and has_shared:
            shared_parts[pp.shared_key] = shared  # keyed by the first LORS member
        kept.append(pp)
    kept_ids = {id(pp) for pp in kept}
    plan.params = [pp for pp in plan.params if pp.kind != "static" or id(pp) in kept_ids]


__all__ = [
    "orientation",
    "layer_objective",
    "layer_grams",
    "fit_calibrated",
    "apply_budget",
    "floor_and_damp",
    "output_gram",
    "SearchMemo",
    "quality_summary",
    "CONVERSION_DAMP",
]


def quality_summary(weighted: list, calibration, refine: int, budget: float | None, report) -> dict:
    """The calibration figures for ``report.quality`` (flat, JSON-friendly)."""
    rel = [
        math.sqrt(max(e, 0.0) / o)
        for errs, outs, _ in weighted
        for e, o in zip(errs, outs, strict=False)
        if o > 0
    ]
    out: dict = {"calibrated": calibration is not None}
    summary = getattr(calibration, "summary", None)
    if callable(summary):
        out["calibration_samples"] = summary()["samples"]
    if rel:
        out["calib_rel_output_error_mean"] = sum(rel) / len(rel)
        out["calib_rel_output_error_max"] = max(rel)
    if refine and weighted:
        sweeps = min(len(h) for _, _, h in weighted)
        out["refine_sweeps"] = refine
        out["refine_weighted_error"] = [sum(h[s] for _, _, h in weighted) for s in range(sweeps)]
    if budget is not None:
        out["budget"] = budget
        out["stacked_fraction"] = report.stacked_fraction  # what the table's stacked total shows
    return out
