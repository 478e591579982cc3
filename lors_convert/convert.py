"""Conversion: the one loop that turns a plan into LORS factors, and the ways into it.

:func:`run_plan` is the loop: for each planned parameter it reads the layer weights through a
getter, fits them (:func:`lors_convert.fit.fit_param`), fills the report row and hands the
:class:`~lors_convert.fit.Fit` to a sink. The sink decides what conversion means:

- :class:`lors_convert.swap.ModuleSink` installs LORS layers in a model (:func:`convert`, the
  Python API, and every conversion that runs the model: calibration, LORSA);
- :class:`lors_convert.checkpoint.CheckpointWriter` writes checkpoint shards as the factors come
  (:func:`convert_file`: Hugging Face directories and ``.safetensors`` + architecture streamed one
  stacked group at a time, TorchScript archives and other whole-loaded models from their state
  dict, ``torchrun`` ranks each writing their shards).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from .calibrate.data import CalibrationData
from .calibrate.fidelity import fidelity, reference_outputs
from .calibrate.grams import collect_grams
from .checkpoint.format import (BUFFER_PREFIX, DEFAULT_SHARD_SIZE, nonpersistent_buffers, plan_stacks,
                                source_manifest, stored_manifest)
from .checkpoint.writer import CheckpointWriter, save
from .counting import count_parameters
from .discover.generators import check_specs_used, make_adaptive_hook
from .discover.plan import ConversionPlan, Groups, ParamPlan, full_rank_note, plan_conversion
from .errors import LorsUsageError, about
from .fit import Fit, FitOptions, fit_param
from .fit.calibrated import SHARING, apply_budget, quality_summary
from .io.atomic import atomic_output, check_output
from .io.dist import Dist
from .io.sources import SourceInfo, file_sha256, load_source, open_lazy, refuse_non_finite
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


def run_plan(plan: ConversionPlan, get: Getter, sink, options: FitOptions, matrices: list[MatrixReport],
             progress: Progress | None = None, shared_parts: dict[str, torch.Tensor] | None = None,
             only: Callable[[ParamPlan], bool] | None = None) -> dict[int, Fit]:
    """THE conversion loop: fit every planned parameter (``only`` those it accepts) and hand it to
    ``sink.put(pp, fit)``; fills each ``matrices`` row's error columns. Returns the fits by plan index
    with their factors dropped (the report figures and the calibrated errors stay)."""
    steps: Iterator = iter(list(enumerate(zip(plan.params, matrices))))
    if progress is not None:
        steps = progress(steps, len(plan.params), "decomposing")
    done: dict[int, Fit] = {}
    for index, (pp, row) in steps:
        if only is not None and not only(pp):
            continue
        biases = LazyWeights(get, pp.bias_keys) if pp.kind == "adaptive" and pp.bias_keys else None
        shared = shared_parts.pop(pp.shared_key, None) if shared_parts is not None else None
        fit = fit_param(pp, LazyWeights(get, pp.keys), options, biases=biases, shared=shared)
        row.relative_error, row.retained_energy = fit.relative_error, fit.retained_energy
        sink.put(pp, fit)
        done[index] = replace(fit, shared=None, factors=None)
    return done


def _plan(model: nn.Module, get: Getter, rank, groups, include, exclude, require_savings, adaptive,
          budget, sharing, options: FitOptions, shared_parts: dict) -> tuple[ConversionPlan, object]:
    """The plan of a conversion; with ``budget`` its ranks come from the allocator (which solves the
    shared parts into ``shared_parts``). Returns the plan and the allocation (or None)."""
    hook = make_adaptive_hook(adaptive, rank, groups) if adaptive is not None else None
    allocation = None
    if budget is not None:
        plan = plan_conversion(model, None, None, include, exclude, require_savings=False, adaptive=hook)
        allocation = apply_budget(plan, get, budget, options.calibration, device=options.device,
                                  shared_parts=shared_parts, sharing=sharing)
    else:
        plan = plan_conversion(model, rank, groups, include, exclude, require_savings, adaptive=hook)
        if rank is None and any(pp.kind == "static" for pp in plan.params):
            plan.warnings.append(full_rank_note(plan.params))  # asked for: exact, and it saves nothing
    if hook is not None:
        check_specs_used(hook)
    return plan, allocation


def _check_sharing(sharing: str) -> None:
    if sharing not in SHARING:
        raise LorsUsageError(f"sharing must be one of {', '.join(SHARING)}, got {sharing!r}")


def _finish_report(report: Report, plan: ConversionPlan, options: FitOptions, fits: dict[int, Fit],
                   allocation) -> None:
    static = [pp for pp in plan.params if pp.kind == "static"]
    if options.refine > 0 and static and not any(pp.has_shared for pp in static):
        report.warnings.append(f"refine={options.refine} had nothing to refine: every converted matrix is "
                               "private-only (no shared part)")
    if options.weighted:
        weighted = [fits[i].weighted for i in sorted(fits) if fits[i].weighted is not None]
        report.quality.update(quality_summary(weighted, options.calibration, options.refine, options.budget,
                                              allocation, report))


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
    progress: Progress | None = None,
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
    ``"PATTERN: G x [RxC, ...]"``, a :class:`lors_convert.discover.generators.GeneratorSpec` or a
    list of them (see :mod:`lors_convert.discover.generators`).

    Calibrated conversion (see :mod:`lors_convert.fit.calibrated`): ``calibration`` maps weight keys
    to input Gram matrices (a :class:`lors_convert.calibrate.grams.Calibration` from
    ``collect_grams``, which by default also holds output-gradient Grams: then the model output's
    error is minimized); the shared part becomes the weighted least-squares fit and the private parts
    the whitened truncated SVD. ``refine`` alternating sweeps re-fit the shared part given the
    private parts. ``budget`` (a fraction of the stacked parameters, e.g. 0.4) replaces
    ``rank``/``groups`` by per-layer ranks from greedy water-filling; matrices that do not break even
    stay dense, and with ``sharing="auto"`` a matrix whose layers share too little to pay for ``W_s``
    becomes private-only (``W_i = B_i A_i``); ``sharing="always"`` keeps a shared part everywhere,
    ``"never"`` none (per-layer low rank).
    """
    options = FitOptions(init=init, method=method, device=device, calibration=calibration, refine=refine,
                         budget=budget)
    _check_sharing(sharing)
    params_before = count_parameters(model)

    def get(key: str) -> torch.Tensor:
        return model.get_parameter(key).detach()

    shared_parts: dict[str, torch.Tensor] = {}  # solved once for the budget, reused by the fits
    plan, allocation = _plan(model, get, rank, groups, include, exclude, require_savings, adaptive, budget,
                             sharing, options, shared_parts)
    report, matrices = plan.report_with_matrices(params_before)
    fits = run_plan(plan, get, ModuleSink(model), options, matrices, progress, shared_parts)
    report.params_after = count_parameters(model)
    _finish_report(report, plan, options, fits, allocation)
    return model, report


def calibrated_convert(model: nn.Module, data: CalibrationData, *, refine: int = 0,
                       budget: float | None = None, rank: int | None = 8, progress=None,
                       objective: str = "output", probes: int | None = None, **convert_kwargs):
    """The whole ``lors convert --calibrate DATA`` path in one call.

    Collects the Grams on ``data.calibration`` (``objective``, ``probes``: see
    :func:`lors_convert.calibrate.grams.collect_grams`), records the source outputs on
    ``data.heldout``, converts ``model`` in place (:func:`convert` with ``calibration=``, ``refine=``,
    ``budget=``; other keyword arguments go to it) and adds the held-out fidelity to
    ``report.quality`` (``heldout_cosine`` for text encoders, ``heldout_rel_error`` always).
    Returns ``(lors_model, report)``.
    """
    include, exclude = convert_kwargs.get("include"), convert_kwargs.get("exclude")
    with about(data.source or None):  # inputs the model cannot run on name their file
        calibration = collect_grams(model, data.calibration, include=include, exclude=exclude,
                                    objective=objective, probes=probes)
    with about(data.heldout_origin or None):
        reference = reference_outputs(model, data.heldout) if data.heldout else None
    model, report = convert(model, rank=rank, calibration=calibration, refine=refine, budget=budget,
                            progress=progress, **convert_kwargs)
    report.quality.update(data.summary())  # samples fitted, samples held out and where from
    report.quality["objective"] = calibration.objective
    if reference is not None:
        report.quality.update(fidelity(model, reference))
    for key, why in sorted(calibration.skipped.items())[:5]:
        report.warnings.append(f"{key}: no calibration Gram ({why}); converted with the unweighted fit")
    return model, report


# ---------------------------------------------------------------------------------------------
# from files: the CLI's conversion


def convert_file(src: str | Path, out: str | Path | None, *, arch: str | None = None, trust_pickle: bool = False,
                 calibration_data: CalibrationData | None = None, objective: str = "output",
                 probes: int | None = None, max_shard_size: int | str = DEFAULT_SHARD_SIZE, force: bool = False,
                 dist: Dist | None = None, dry_run: bool = False, **convert_kwargs) -> Report | None:
    """Convert the model at ``src`` into the checkpoint directory ``out`` (atomically) and return the
    report; ``dry_run`` returns the report of the plan and writes nothing.

    ``convert_kwargs`` are :func:`convert`'s. A model that has to run (``calibration_data``) or
    whose generators become LORSA layers (``adaptive``) is converted in memory and saved; every other
    conversion writes the checkpoint from the weights directly, streamed from an HF directory or a
    ``.safetensors`` file + ``arch`` (one stacked group in memory), else from the loaded model's state
    dict (TorchScript, pickles). Returns None on ``torchrun`` ranks other than 0.
    """
    src = Path(src)
    dist = dist or Dist()
    out = Path(out) if out is not None else None
    in_memory = calibration_data is not None or convert_kwargs.get("adaptive") is not None
    lazy = None if in_memory else open_lazy(src, arch)
    if lazy is not None:
        model, reader, source = lazy
        with about(src):
            manifest = stored_manifest(source_manifest(model), reader)
        if manifest is not None:
            return _convert_weights(src, out, model, reader.get, manifest, source, dist, dry_run, force,
                                    max_shard_size, hash_files=reader.files, **convert_kwargs)
    if dist.world > 1:
        raise LorsUsageError("distributed conversion needs a Hugging Face directory or .safetensors + --arch")
    model, source = load_source(src, arch=arch, trust_pickle=trust_pickle)
    manifest = source_manifest(model)
    if source.kind == "torchscript" and in_memory:
        raise LorsUsageError("--adaptive/--calibrate need a rebuildable model, not a TorchScript archive")
    if not in_memory:
        state = model.state_dict()
        return _convert_weights(src, out, model, state.__getitem__, manifest, source, dist, dry_run, force,
                                max_shard_size, **convert_kwargs)
    if dry_run:
        return _dry_run(src, model, calibration_data, objective, probes, convert_kwargs)
    if calibration_data is not None:
        lors_model, report = calibrated_convert(model, calibration_data, objective=objective, probes=probes,
                                                **convert_kwargs)
    else:
        with about(src):
            lors_model, report = convert(model, **convert_kwargs)
    save(lors_model, out, report=report, source=source, manifest=manifest, force=force,
         max_shard_size=max_shard_size)
    return report


def _dry_run(src: Path, model: nn.Module, data: CalibrationData | None, objective: str, probes: int | None,
             kw: dict) -> Report:
    """The plan a real in-memory run would make, without fitting: ranks under a budget need the
    Grams, so those are collected (the one expensive step of a dry run)."""
    budget = kw.get("budget")
    calibration = None
    if data is not None and budget is not None:
        calibration = collect_grams(model, data.calibration, include=kw.get("include"), exclude=kw.get("exclude"),
                                    objective=objective, probes=probes)
    options = FitOptions(calibration=calibration, refine=kw.get("refine", 0), budget=budget)
    with about(src):
        plan, _ = _plan(model, lambda key: model.get_parameter(key).detach(), kw.get("rank", 8), kw.get("groups"),
                        kw.get("include"), kw.get("exclude"), kw.get("require_savings", True), kw.get("adaptive"),
                        budget, kw.get("sharing", "auto"), options, {})
    report = plan.report(count_parameters(model))
    if data is not None:
        report.warnings.append("dry run: factors not fitted, so no error or fidelity was measured"
                               + (" (the budget's ranks come from the calibration Grams)" if budget is not None
                                  else ""))
    return report


def _convert_weights(src: Path, out: Path | None, model: nn.Module, get: Getter, manifest: dict,
                     source: SourceInfo, dist: Dist, dry_run: bool, force: bool, max_shard_size,
                     hash_files: list[Path] | None = None, rank=8, groups=None, include=None, exclude=None,
                     init="svd", method="auto", device=None, require_savings=True, progress=None,
                     adaptive=None, calibration=None, refine=0, budget=None, sharing="auto") -> Report | None:
    """Convert from weights alone into a checkpoint: ``model`` gives the structure (meta tensors or
    real ones), ``get`` the stored tensors."""
    if adaptive is not None or calibration is not None:
        raise LorsUsageError("adaptive and calibrated conversions run on the in-memory model")
    options = FitOptions(init=init, method=method, device=device, refine=refine, budget=budget)
    _check_sharing(sharing)
    shared_parts: dict[str, torch.Tensor] = {}
    with about(src):
        plan, allocation = _plan(model, get, rank, groups, include, exclude, require_savings, None, budget,
                                 sharing, options, shared_parts)
    for pp in plan.params:  # the stored dtype, not a meta model's default
        pp.param = replace(pp.param, dtype=getattr(torch, manifest["keys"][pp.keys[0]]["dtype"]))
    report, matrices = plan.report_with_matrices(count_parameters(model))
    if dry_run:
        return report
    if dist.is_main:
        check_output(out, force)
    if hash_files is not None:
        source.sha256 = file_sha256(hash_files)
    converted = {key for pp in plan.params for key in pp.converted_keys}  # a member kept dense is untouched
    untouched = [k for k in manifest["keys"] if k not in converted and k not in manifest["aliases"]]
    buffers = nonpersistent_buffers(model)
    specs = {key: (tuple(shape), pp.param.dtype) for pp in plan.params for key, shape in pp.tensor_specs()}
    specs.update({k: (tuple(manifest["keys"][k]["shape"]), getattr(torch, manifest["keys"][k]["dtype"]))
                  for k in untouched})
    specs.update({BUFFER_PREFIX + name: (tuple(b.shape), b.dtype) for name, b in buffers.items()})
    stacks = plan_stacks(plan)

    def write(tmp: Path) -> dict[int, tuple]:
        writer = CheckpointWriter(tmp, stacks, source, manifest, specs, max_shard_size, dist)
        with about(src):
            fits = run_plan(plan, get, writer, options, matrices, progress, shared_parts, only=writer.wants)
        for key in untouched:
            if writer.shards.wants(key):
                t = get(key)
                refuse_non_finite(t, key, src)
                writer.put_tensor(key, t)
        for name, b in buffers.items():
            writer.put_tensor(BUFFER_PREFIX + name, b)
        measured = {i: (f.relative_error, f.retained_energy) for i, f in fits.items()}
        if not dist.is_main:
            writer.shards.close()
            return measured
        dist.barrier()
        for part in dist.gather(measured):
            for i, (errors, energies) in part.items():
                matrices[i].relative_error, matrices[i].retained_energy = errors, energies
        _finish_report(report, plan, options, fits, allocation)
        writer.close(report)
        return measured

    if not dist.is_main:
        measured = write(Path(dist.broadcast(None)))
        dist.barrier()
        dist.gather(measured)
        return None
    with atomic_output(out, force) as tmp:
        dist.broadcast(str(tmp))
        write(tmp)
    return report


__all__ = ["convert", "calibrated_convert", "convert_file", "run_plan", "LazyWeights"]
