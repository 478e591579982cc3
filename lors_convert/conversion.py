"""Conversion: the one loop that turns a plan into LORS factors, and the ways into it.

:func:`run_plan` is the loop: for each planned parameter it reads the layer weights through a
getter, fits them (:func:`lors_convert.fit.fit_param`), fills the report row and hands the
:class:`~lors_convert.fit.Fit` to a sink. The sink decides what conversion means:

- :class:`lors_convert.swap.ModuleSink` installs LORS layers in a model (:func:`convert`, the
  Python API, and every conversion that runs the model: calibration, LORSA);
- :class:`lors_convert.checkpoint.CheckpointWriter` writes checkpoint shards as the factors come
  (:mod:`lors_convert.convert_weights`: Hugging Face directories and ``.safetensors`` +
  architecture streamed one stacked group at a time, TorchScript archives and other whole-loaded
  models from their state dict, ``torchrun`` ranks each writing their shards).

What is converted, and how, is a :class:`~lors_convert.options.ConvertOptions`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace

import torch
from torch import nn

from .calibrate.closed_loop import block_chain, closed_loop_pass
from .calibrate.data import CalibrationData
from .calibrate.fidelity import Reference, fidelity, is_causal_lm, reference_outputs
from .calibrate.grams import collect_grams
from .counting import count_parameters
from .discover.generators import check_specs_used, make_adaptive_hook
from .discover.plan import ConversionPlan, ParamPlan, full_rank_note, plan_conversion
from .discover.stacks import find_stacks
from .errors import LorsError, about
from .fit import Fit, FitOptions, SearchMemo, fit_param
from .fit.calibrated import apply_budget, quality_summary
from .fit.closed_loop import record_refits, refitter
from .heap import trim
from .io.spill import Spill, SpilledModules
from .options import ConvertOptions
from .report import MatrixReport, Report
from .swap import ModuleSink

Progress = Callable[[Iterator, int, str], Iterator]
Getter = Callable[[str], torch.Tensor]


class LazyWeights(Sequence):
    """The layer tensors of one planned parameter, each read when the fit reaches it."""

    def __init__(self, get: Getter, keys: list[str]):
        self.get, self.keys = get, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.get(k) for k in self.keys[i]]
        return self.get(self.keys[i])


def run_plan(
    plan: ConversionPlan,
    get: Getter,
    sink,
    options: FitOptions,
    matrices: list[MatrixReport],
    progress: Progress | None = None,
    shared_parts: dict[str, torch.Tensor] | None = None,
    only: Callable[[ParamPlan], bool] | None = None,
) -> dict[int, Fit]:
    """THE conversion loop: fit every planned parameter (``only`` those it accepts) and hand it to
    ``sink.put(pp, fit)``; fills each ``matrices`` row's error columns. Returns the fits by plan index
    with their factors dropped (the report figures and the calibrated errors stay)."""
    steps: Iterator = iter(list(enumerate(zip(plan.params, matrices, strict=False))))
    if progress is not None:
        steps = progress(steps, len(plan.params), "decomposing")
    done: dict[int, Fit] = {}
    for index, (pp, row) in steps:
        if only is not None and not only(pp):
            continue
        biases = LazyWeights(get, pp.bias_keys) if pp.kind == "adaptive" and pp.bias_keys else None
        shared = shared_parts.pop(pp.shared_key, None) if shared_parts is not None else None
        fit = fit_param(pp, LazyWeights(get, pp.keys), options, biases=biases, shared=shared)
        sink.put(pp, fit)
        fit.settle()  # an iterated fit's errors are complete once its factors are consumed
        row.relative_error, row.retained_energy = fit.relative_error, fit.retained_energy
        done[index] = replace(fit, shared=None, factors=None)
        trim()  # this parameter's work is freed: the next one starts from the same RSS
    return done


def make_plan(model: nn.Module, get: Getter, fit: FitOptions, shared_parts: dict) -> ConversionPlan:
    """The plan of a conversion; with a budget its ranks come from the allocator (which solves the
    shared parts into ``shared_parts``, kept in ``fit.memo`` when there is one)."""
    o = fit.convert
    hook = make_adaptive_hook(o.adaptive, o.rank, o.groups) if o.adaptive is not None else None
    if o.budget is not None:
        plan = plan_conversion(model, None, None, o.include, o.exclude, require_savings=False, adaptive=hook)
        apply_budget(
            plan,
            get,
            o.budget,
            fit.calibration,
            device=o.device,
            shared_parts=shared_parts,
            sharing=o.sharing,
            memo=fit.memo,
        )
    else:
        plan = plan_conversion(
            model, o.rank, o.groups, o.include, o.exclude, o.require_savings, adaptive=hook
        )
        if o.rank is None and any(pp.kind == "static" for pp in plan.params):
            plan.warnings.append(full_rank_note(plan.params))  # asked for: exact, and it saves nothing
    if hook is not None:
        check_specs_used(hook)
    return plan


def finish_report(report: Report, plan: ConversionPlan, options: FitOptions, fits: dict[int, Fit]) -> None:
    static = [pp for pp in plan.params if pp.kind == "static"]
    if options.refine > 0 and static and not any(pp.has_shared for pp in static):
        report.warnings.append(
            f"refine={options.refine} had nothing to refine: every converted matrix is "
            "private-only (no shared part)"
        )
    if options.weighted:
        weighted = [fits[i].weighted for i in sorted(fits) if fits[i].weighted is not None]
        report.quality.update(
            quality_summary(weighted, options.calibration, options.refine, options.budget, report)
        )


def convert(
    model: nn.Module,
    options: ConvertOptions | None = None,
    *,
    calibration=None,
    progress: Progress | None = None,
    memo: SearchMemo | None = None,
    **changes,
) -> tuple[nn.Module, Report]:
    """Convert ``model`` **in place** to LORS and return it with the savings report.

    ``options`` (:class:`~lors_convert.options.ConvertOptions`, which documents every field and
    holds the defaults) say how; keyword arguments change its fields: ``convert(model, rank=8,
    groups=[1, 1, 2, 2, 3, 3])``. ``adaptive`` selects parameter generators for LORSA: ``"auto"``
    (torch.fx detection), a spec ``"PATTERN: G x [RxC, ...]"``, a
    :class:`lors_convert.discover.specs.GeneratorSpec` or a list of them (see
    :mod:`lors_convert.discover.specs`).

    Calibrated conversion (see :mod:`lors_convert.fit.calibrated`): ``calibration`` maps weight keys
    to input Gram matrices (a :class:`lors_convert.calibrate.grams.Calibration` from
    ``collect_grams``, which by default also holds output-gradient Grams: then the model output's
    error is minimized); the shared part becomes the weighted least-squares fit and the private parts
    the whitened truncated SVD. ``refine`` alternating sweeps re-fit the shared part given the
    private parts. ``budget`` (a fraction of the stacked parameters, e.g. 0.4) replaces
    ``rank``/``groups`` by per-layer ranks from greedy water-filling; matrices that do not break even
    stay dense, and with ``sharing="auto"`` a matrix whose layers share too little to pay for ``W_s``
    becomes private-only (``W_i = B_i A_i``); ``sharing="always"`` keeps a shared part everywhere,
    ``"never"`` none (per-layer low rank). ``progress`` wraps the loop over parameters.
    ``memo``: a :class:`~lors_convert.fit.SearchMemo` shared by conversions of the same weights and
    calibration at several budgets, which then solve the budget's spectra, shared parts and fits once
    (``--target``): each gives the factors it would give alone.
    """
    if options is not None and not isinstance(options, ConvertOptions):
        raise TypeError(f"convert's options must be a ConvertOptions (or keywords), got {options!r}")
    fit = FitOptions(options, calibration, memo, **changes)
    report, plan, _, fits = fit_model(model, fit, progress)
    finish_report(report, plan, fit, fits)
    return model, report


def fit_model(model: nn.Module, fit: FitOptions, progress: Progress | None = None):
    """:func:`convert` up to its report's calibration figures: plan, fit and install in place.
    Returns ``(report, plan, report rows parallel to plan.params, fits by plan index)``."""
    params_before = count_parameters(model)

    def get(key: str) -> torch.Tensor:
        return model.get_parameter(key).detach()

    shared_parts: dict[str, torch.Tensor] = {}  # solved once for the budget, reused by the fits
    plan = make_plan(model, get, fit, shared_parts)
    report, matrices = plan.report_with_matrices(params_before)
    fits = run_plan(plan, get, ModuleSink(model), fit, matrices, progress, shared_parts)
    report.params_after = count_parameters(model)
    return report, plan, matrices, fits


def calibrated_convert(
    model: nn.Module,
    data: CalibrationData,
    options: ConvertOptions | None = None,
    *,
    progress=None,
    objective: str = "output",
    probes: int | None = None,
    reference: Reference | None = None,
    spill: Spill | None = None,
    **changes,
):
    """The whole ``lors convert --calibrate DATA`` path in one call.

    Collects the Grams on ``data.calibration`` (``objective``, ``probes``: see
    :func:`lors_convert.calibrate.grams.collect_grams`), converts ``model`` in place (:func:`convert`
    with ``options``, changed by the keyword arguments, and the Grams) and adds the fidelity on
    ``reference`` (default: ``data.heldout`` against a copy of the source) to ``report.quality``.
    ``spill``: keep the Grams (and the default reference's outputs) on disk there, not in memory.
    Returns ``(lors_model, report)``.
    """
    options = ConvertOptions.of(options, **changes)
    with about(data.source or None):  # inputs the model cannot run on name their file
        calibration = collect_grams(
            model,
            data.calibration,
            include=options.include,
            exclude=options.exclude,
            objective=objective,
            probes=probes,
            spill=spill,
        )
    if reference is None and data.heldout:
        with about(data.heldout_origin or None):
            reference = reference_outputs(model, data.heldout, spill=spill)
    skipped: list[str] = []  # why the closed loop cannot run, if it cannot
    sources = source_blocks(model, options, data.calibration, skipped, spill)
    # the closed loop refits the private factors: the fits leave them to it
    fit = FitOptions(options, calibration, refit_later=sources is not None)
    report, plan, matrices, fits = fit_model(model, fit, progress)
    report.warnings += skipped
    if sources is not None:
        figures: dict = {}
        refitted = closed_loop_pass(model, sources, data.calibration, refitter(calibration, figures=figures))
        _check_refitted(plan, fit, figures)
        record_refits(plan.params, matrices, fits, figures)
        report.quality["closed_loop_layers"] = refitted
    finish_report(report, plan, fit, fits)
    note_calibration(report, data, calibration)
    if reference is not None:
        report.quality.update(fidelity(model, reference))
    return model, report


def _check_refitted(plan: ConversionPlan, fit: FitOptions, figures: dict) -> None:
    """Every layer whose fit was left to the closed loop was refitted by it."""
    left = [pp.keys[i] for pp in plan.params if fit.defers(pp) for i in pp.lors_members]
    missing = [key for key in left if key not in figures]
    if missing:
        raise LorsError(
            f"the closed loop did not reach {len(missing)} layers left to it (first: {missing[0]}): "
            "convert with --open-loop"
        )


def source_blocks(
    model: nn.Module, options: ConvertOptions, batches, warnings: list, spill: Spill | None = None
) -> Mapping[str, nn.Module] | None:
    """For a closed loop (``options.closed_loop``; None: a causal LM's): a copy of each source block of
    the model's one stack, in order, their parameters on disk in ``spill`` when given (a copy of every
    block in memory would double the stacked weights while the model converts; the closed loop takes
    them one at a time). None where there is no closed loop; where one was asked for and it cannot
    walk the model, the reason goes in ``warnings``."""
    wanted = is_causal_lm(model) if options.closed_loop is None else options.closed_loop
    if not wanted or not batches:
        return None
    stacks = find_stacks(model, options.include, options.exclude)
    if len(stacks) != 1:
        why = "it has more than one stack"
    else:
        members = list(stacks[0].members)
        why = block_chain(model, members, batches[0])
    if why is not None:
        if options.closed_loop:
            warnings.append(f"closed loop skipped: {why}; the private factors are the open-loop fit")
        return None
    blocks = {m: model.get_submodule(m) for m in members}
    if spill is not None:
        return SpilledModules(blocks, spill)
    return {m: copy.deepcopy(block) for m, block in blocks.items()}


def note_calibration(report: Report, data: CalibrationData, calibration) -> None:
    """What a calibrated conversion was calibrated on, in the report."""
    report.quality.update(data.summary())  # samples fitted, samples held out and where from
    report.quality["objective"] = calibration.objective
    for key, why in sorted(calibration.skipped.items())[:5]:
        report.warnings.append(f"{key}: no calibration Gram ({why}); converted with the unweighted fit")


__all__ = [
    "convert",
    "calibrated_convert",
    "fit_model",
    "run_plan",
    "make_plan",
    "finish_report",
    "LazyWeights",
]
