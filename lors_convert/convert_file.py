"""``lors convert``: a model file in, a LORS checkpoint out, and what the conversion did to the model.

:func:`convert_file` picks the way in, runs the conversion loop (:func:`lors_convert.conversion.run_plan`)
and measures the result on held-out inputs:

- weights only (no model run): Hugging Face directories, ``.safetensors`` + architecture and GGUF
  files are streamed one stacked group at a time, TorchScript archives and pickled modules converted from their
  state dict; the :class:`~lors_convert.checkpoint.CheckpointWriter` is the loop's sink;
- in memory, when the model has to run (calibration, ``--target``) or its generators become LORSA
  layers: converted in place and saved.

Fidelity (:mod:`lors_convert.calibrate.fidelity`) is measured by default, on ``--heldout``, else the
held-out part of the calibration data, else the probes that fit the model
(:mod:`lors_convert.calibrate.probes`); when it cannot be, the report says why. A Hugging Face
text model asked for a budget or a target without calibration data is calibrated on the shipped text.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from .calibrate.data import CalibrationData, check_data_file, has_tokenizer, load_calibration, load_tokenizer
from .calibrate.fidelity import Reference, check_inputs, fidelity, fidelity_problems, reference_outputs
from .calibrate.grams import collect_grams
from .calibrate.probes import CALIBRATION_TEXT, PROBE_TEXT, Probes, default_probes, read_probes
from .calibrate.streamed import lockstep
from .checkpoint.format import (
    BUFFER_PREFIX,
    DEFAULT_SHARD_SIZE,
    REPORT_NAME,
    nonpersistent_buffers,
    plan_stacks,
    source_manifest,
    stored_manifest,
)
from .checkpoint.merge import merged_getter, merged_tensors
from .checkpoint.reader import Checkpoint
from .checkpoint.writer import CheckpointWriter, save
from .conversion import (
    Getter,
    calibrated_convert,
    check_sharing,
    convert,
    finish_report,
    make_plan,
    note_calibration,
    run_plan,
)
from .counting import count_parameters
from .errors import LorsUsageError, about
from .fit import FitOptions
from .io.atomic import atomic_output, check_output
from .io.dist import Dist
from .io.hf import is_hf_dir
from .io.memory import own_memory
from .io.safetensors import dump_json
from .io.sources import SourceInfo, load_source, open_lazy, refuse_non_finite
from .io.spill import Spill
from .report import Report
from .target import Target, search_budget

NEXT_STEPS = "try --calibrate DATA, a larger --budget or --target, or lors heal"


def convert_file(
    src: str | Path,
    out: str | Path | None,
    *,
    arch: str | None = None,
    trust_pickle: bool = False,
    calibrate: Path | None = None,
    heldout: Path | None = None,
    heldout_fraction: float | None = None,
    target: Target | None = None,
    objective: str = "output",
    probes: int | None = None,
    measure: bool = True,
    max_shard_size: int | str = DEFAULT_SHARD_SIZE,
    force: bool = False,
    dist: Dist | None = None,
    dry_run: bool = False,
    log: Callable[[str], None] | None = None,
    **convert_kwargs,
) -> Report | None:
    """Convert the model at ``src`` into the checkpoint directory ``out`` (atomically) and return the
    report; ``dry_run`` returns the report of the plan and writes nothing.

    ``convert_kwargs`` are :func:`lors_convert.convert`'s. ``calibrate``/``heldout``: calibration and
    held-out input files (text for Hugging Face text models, else ``.safetensors``/``.pt`` tensors);
    ``target``: search the smallest budget that keeps it; ``measure``: measure fidelity (default).
    ``log`` receives progress lines. Returns None on ``torchrun`` ranks other than 0.
    """
    src, out, dist = Path(src), Path(out) if out is not None else None, dist or Dist()
    text_model = (is_hf_dir(src) or src.is_file()) and has_tokenizer(src)  # a GGUF file carries its tokenizer
    if target is not None and convert_kwargs.get("budget") is not None:
        raise LorsUsageError("--target chooses the budget: give --target or --budget, not both")
    wants_budget = convert_kwargs.get("budget") is not None or target is not None
    calibrated = calibrate is not None or (text_model and wants_budget)
    in_memory = calibrated or target is not None or convert_kwargs.get("adaptive") is not None
    lazy = None if in_memory else open_lazy(src, arch)
    if lazy is not None:
        model, reader, source = lazy
        with about(src):
            manifest = stored_manifest(source_manifest(model), reader)
        if manifest is not None:
            aliases = manifest["aliases"]
            measurer = (
                _measurer(
                    src,
                    arch,
                    trust_pickle,
                    None,
                    heldout,
                    text_model,
                    model,
                    lambda key: reader.get(aliases.get(key, key)),
                )
                if measure
                else None
            )
            return _convert_weights(
                src,
                out,
                model,
                reader.get,
                manifest,
                source,
                dist,
                dry_run,
                force,
                max_shard_size,
                measurer,
                **convert_kwargs,
            )
        source.cancel_hash()  # loaded whole below, which hashes it again
    if dist.world > 1:
        raise LorsUsageError("distributed conversion needs a Hugging Face directory or .safetensors + --arch")
    model, source = load_source(src, arch=arch, trust_pickle=trust_pickle)
    manifest = source_manifest(model, source.stored)
    if source.kind == "torchscript" and in_memory:
        raise LorsUsageError(
            "--adaptive, --calibrate and --target need a rebuildable model, not a TorchScript archive"
        )
    if in_memory:
        own_memory(model)  # the weights conversion replaces are then freed
    if not in_memory:
        measurer = _measurer(src, arch, trust_pickle, model, heldout, text_model, model) if measure else None
        state = model.state_dict()
        return _convert_weights(
            src,
            out,
            model,
            state.__getitem__,
            manifest,
            source,
            dist,
            dry_run,
            force,
            max_shard_size,
            measurer,
            **convert_kwargs,
        )
    data, probe = (
        _calibration_data(calibrate, heldout, src, text_model, heldout_fraction)
        if calibrated
        else (None, None)
    )
    if (measure or target is not None) and (probe is None or not probe.batches):
        probe = _probes(src, heldout, text_model, model)
    elif not (measure or target is not None):
        probe = None
    if probe is not None and probe.batches and (dry_run or target is not None):
        with about(probe.origin):
            check_inputs(model, probe.batches)
    if out is not None and not dry_run:
        check_output(out, force)  # before the work, not after it
    spill = Spill(near=out.parent if out is not None else None)  # Grams and reference outputs
    try:
        if dry_run:
            return _dry_run(src, model, data, objective, probes, target, convert_kwargs, spill)
        if target is not None:
            lors_model, report = _search(
                src, model, data, probe, target, objective, probes, log, convert_kwargs, spill
            )
        else:
            with about(probe.origin if probe is not None else None):  # also checks the probes run
                reference = _reference(model, probe, spill)
            if data is not None:  # its own held-out batches are measured only through ``reference``
                lors_model, report = calibrated_convert(
                    model,
                    replace(data, heldout=[]),
                    objective=objective,
                    probes=probes,
                    reference=reference,
                    spill=spill,
                    **convert_kwargs,
                )
            else:
                with about(src):
                    lors_model, report = convert(model, **convert_kwargs)
                if reference is not None:
                    with about(probe.origin):
                        report.quality.update(fidelity(lors_model, reference))
    finally:
        spill.close()
    _judge(report, probe)
    save(
        lors_model,
        out,
        report=report,
        source=source,
        manifest=manifest,
        force=force,
        max_shard_size=max_shard_size,
    )
    return report


# ---------------------------------------------------------------------------------------------
# inputs


def _calibration_data(
    calibrate: Path | None,
    heldout: Path | None,
    src: Path,
    text_model: bool,
    heldout_fraction: float | None = None,
) -> tuple[CalibrationData, Probes]:
    """The calibration data asked for, or the shipped text (held out: the shipped probe text), and
    its held-out part as probes."""
    path = calibrate if calibrate is not None else CALIBRATION_TEXT
    is_text = path.suffix not in (".safetensors", ".pt", ".pth", ".bin")
    check_data_file(path)
    if is_text and not text_model:
        raise LorsUsageError(
            f"{path}: text calibration needs a Hugging Face text model (its tokenizer); "
            "give a .safetensors/.pt file of model inputs instead"
        )
    tokenizer = load_tokenizer(src) if is_text else None
    if calibrate is None and heldout is None:
        heldout = PROBE_TEXT
    data = load_calibration(path, tokenizer=tokenizer, heldout_path=heldout, heldout=heldout_fraction)
    if calibrate is None:
        data.source = f"lors calibration text ({data.n_calibration} lines, shipped)"
    if heldout is not None:
        label = "lors probe text (shipped)" if heldout == PROBE_TEXT else f"{heldout.name} (--heldout)"
    else:
        label = f"held-out {data.n_heldout} samples of {path.name}"
    return data, Probes(data.heldout, label, origin=data.heldout_origin)


def _probes(src: Path, heldout: Path | None, text_model: bool, model) -> Probes:
    if heldout is not None:
        return read_probes(heldout, src if text_model else None)
    return default_probes(src if text_model else None, getattr(model, "config", None))


def _reference(model: nn.Module, probe: Probes | None, spill: Spill) -> Reference | None:
    """The source's outputs on the probes, recorded on ``spill`` (not a second model in memory)."""
    if probe is None or not probe.batches:
        return None
    return reference_outputs(model, probe.batches, probe.label, probe.synthetic, spill=spill)


def _judge(report: Report, probe: Probes | None, why_not: str | None = None) -> None:
    """Say what fidelity was measured on, or plainly why none was, and warn when it is poor."""
    if probe is None:
        return
    why_not = why_not or probe.why_none
    if why_not is not None or "heldout_rel_error" not in report.quality:
        report.quality["heldout_measured"] = False
        report.warnings.append(f"fidelity not measured: {why_not or 'no held-out inputs'}")
        return
    report.quality["heldout_measured"] = True
    problems = fidelity_problems(report.quality)
    if problems:
        report.warnings.append(
            f"poor fidelity on {probe.label}: {'; '.join(problems)}: the converted model may "
            f"not work; {NEXT_STEPS}"
        )


# ---------------------------------------------------------------------------------------------
# in memory


def _search(src, model, data, probe, target, objective, probes, log, kw, spill: Spill):
    if probe is None or not probe.batches:
        raise LorsUsageError(f"--target needs held-out inputs to measure: {probe.why_none if probe else ''}")
    calibration = None
    if data is not None:
        with about(data.source or None):
            calibration = collect_grams(
                model,
                data.calibration,
                include=kw.get("include"),
                exclude=kw.get("exclude"),
                objective=objective,
                probes=probes,
                spill=spill,
            )
    reference = Reference(model, probe.batches, probe.label, probe.synthetic)  # the search converts copies
    with about(src):
        options = {k: v for k, v in kw.items() if k != "budget"}
        best, report, points = search_budget(
            model, reference, target, dict(options, calibration=calibration), log
        )
    if data is not None:
        note_calibration(report, data, calibration)
    report.quality.update(fidelity(best, reference))
    report.quality["target"] = {"target": str(target), "frontier": [p.to_dict(target) for p in points]}
    return best, report


def _dry_run(
    src: Path,
    model: nn.Module,
    data: CalibrationData | None,
    objective: str,
    probes: int | None,
    target: Target | None,
    kw: dict,
    spill: Spill,
) -> Report:
    """The plan a real in-memory run would make, without fitting: ranks under a budget need the
    Grams, so those are collected (the one expensive step of a dry run)."""
    budget = kw.get("budget") if target is None else 0.5
    calibration = None
    if data is not None and budget is not None:
        calibration = collect_grams(
            model,
            data.calibration,
            include=kw.get("include"),
            exclude=kw.get("exclude"),
            objective=objective,
            probes=probes,
            spill=spill,
        )
    options = FitOptions(calibration=calibration, refine=kw.get("refine", 0), budget=budget)
    with about(src):
        plan = make_plan(
            model,
            lambda key: model.get_parameter(key).detach(),
            kw.get("rank", 8),
            kw.get("groups"),
            kw.get("include"),
            kw.get("exclude"),
            kw.get("require_savings", True),
            kw.get("adaptive"),
            budget,
            kw.get("sharing", "auto"),
            options,
            {},
        )
    report = plan.report(count_parameters(model))
    if target is not None:
        report.warnings.append(
            f"dry run: --target {target} searches budgets by converting and measuring; this is "
            "the plan of its first candidate, budget 0.5"
        )
    elif data is not None:
        report.warnings.append(
            "dry run: factors not fitted, so no error or fidelity was measured"
            + (" (the budget's ranks come from the calibration Grams)" if budget is not None else "")
        )
    return report


# ---------------------------------------------------------------------------------------------
# weights only


def _measurer(
    src,
    arch,
    trust_pickle,
    loaded: nn.Module | None,
    heldout,
    text_model,
    structure: nn.Module,
    get: Getter | None = None,
):
    """A function measuring a written checkpoint against its source, or None when the probes say
    there is nothing to measure on (the reason goes in the report). ``loaded``: the source model in
    memory; else the skeleton ``structure`` runs block by block, its weights read through ``get``
    (the source) and from the checkpoint (the conversion): one block in memory at a time."""

    def measure(checkpoint_dir: Path, report: Report) -> None:
        probe = _probes(src, heldout, text_model, structure)
        if not probe.batches:
            _judge(report, probe)
            return
        ckpt = Checkpoint(checkpoint_dir)
        spill = Spill(near=checkpoint_dir.parent)  # the source's outputs
        try:
            with about(probe.origin):
                if loaded is not None:
                    reference = reference_outputs(
                        loaded, probe.batches, probe.label, probe.synthetic, spill=spill
                    )
                    report.quality.update(fidelity(_merge_into(loaded, ckpt), reference))
                else:
                    reference = reference_outputs(
                        structure,
                        probe.batches,
                        probe.label,
                        probe.synthetic,
                        spill=spill,
                        run=functools.partial(lockstep, structure, get),
                    )
                    report.quality.update(
                        fidelity(
                            structure,
                            reference,
                            run=functools.partial(lockstep, structure, merged_getter(ckpt)),
                        )
                    )
        finally:
            spill.close()
        _judge(report, probe)

    return measure


@torch.no_grad()
def _merge_into(source: nn.Module, ckpt: Checkpoint) -> nn.Module:
    """``source`` with its converted weights replaced, in place, by the checkpoint's merged ones."""
    owners = tuple(ckpt.owner_prefixes())
    params = dict(source.state_dict(keep_vars=True))
    for key, t in merged_tensors(ckpt):
        if not key.startswith(owners):
            break  # the converted groups come first; the rest is the source's own
        params[key].copy_(t)
    return source


def _convert_weights(
    src: Path,
    out: Path | None,
    model: nn.Module,
    get: Getter,
    manifest: dict,
    source: SourceInfo,
    dist: Dist,
    dry_run: bool,
    force: bool,
    max_shard_size,
    measure,
    rank=8,
    groups=None,
    include=None,
    exclude=None,
    init="svd",
    method="auto",
    device=None,
    require_savings=True,
    progress=None,
    adaptive=None,
    calibration=None,
    refine=0,
    budget=None,
    sharing="auto",
) -> Report | None:
    """Convert from weights alone into a checkpoint: ``model`` gives the structure (meta tensors or
    real ones), ``get`` the stored tensors; ``measure(dir, report)`` adds fidelity before the rename."""
    if adaptive is not None or calibration is not None:
        raise LorsUsageError("adaptive and calibrated conversions run on the in-memory model")
    options = FitOptions(init=init, method=method, device=device, refine=refine, budget=budget)
    check_sharing(sharing)
    shared_parts: dict[str, torch.Tensor] = {}
    with about(src):
        plan = make_plan(
            model,
            get,
            rank,
            groups,
            include,
            exclude,
            require_savings,
            None,
            budget,
            sharing,
            options,
            shared_parts,
        )
    for pp in plan.params:  # the stored dtype, not a meta model's default
        pp.param = replace(pp.param, dtype=getattr(torch, manifest["keys"][pp.keys[0]]["dtype"]))
    report, matrices = plan.report_with_matrices(count_parameters(model))
    if dry_run:
        source.cancel_hash()
        return report
    if dist.is_main:
        check_output(out, force)
    source.finish_hash()  # started when the source was opened (io/digest.py)
    converted = {key for pp in plan.params for key in pp.converted_keys}  # a member kept dense is untouched
    untouched = [k for k in manifest["keys"] if k not in converted and k not in manifest["aliases"]]
    buffers = nonpersistent_buffers(model)
    specs = {key: (tuple(shape), pp.param.dtype) for pp in plan.params for key, shape in pp.tensor_specs()}
    specs.update(
        {
            k: (tuple(manifest["keys"][k]["shape"]), getattr(torch, manifest["keys"][k]["dtype"]))
            for k in untouched
        }
    )
    specs.update({BUFFER_PREFIX + name: (tuple(b.shape), b.dtype) for name, b in buffers.items()})
    stacks = plan_stacks(plan)

    def write(tmp: Path) -> dict[int, tuple]:
        writer = CheckpointWriter(tmp, stacks, source, manifest, specs, max_shard_size, dist)
        # the untouched tensors first, each read and written alone: after the groups, the freed heap
        # of a stacked group (kept by the allocator) would add to an embedding's pages
        for key in untouched:
            if writer.shards.wants(key):
                t = get(key)
                refuse_non_finite(t, key, src)
                writer.put_tensor(key, t)
                del t
        for name, b in buffers.items():
            writer.put_tensor(BUFFER_PREFIX + name, b)
        with about(src):
            fits = run_plan(plan, get, writer, options, matrices, progress, shared_parts, only=writer.wants)
        measured = {i: (f.relative_error, f.retained_energy) for i, f in fits.items()}
        if not dist.is_main:
            writer.shards.close()
            return measured
        dist.barrier()
        for part in dist.gather(measured):
            for i, (errors, energies) in part.items():
                matrices[i].relative_error, matrices[i].retained_energy = errors, energies
        finish_report(report, plan, options, fits)
        writer.close(report)
        if measure is not None:  # on the finished checkpoint, before it is renamed into place
            measure(tmp, report)
            (tmp / REPORT_NAME).write_text(dump_json(report.to_dict()))
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


__all__ = ["convert_file", "NEXT_STEPS"]
