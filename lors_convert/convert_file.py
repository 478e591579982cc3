"""``lors convert``: a model file in, a LORS checkpoint out, and what the conversion did to the model.

:func:`convert_file` picks the way in, runs the conversion loop (:func:`lors_convert.conversion.run_plan`)
and measures the result on held-out inputs (:mod:`lors_convert.measure`):

- weights only (no model run, :mod:`lors_convert.convert_weights`): Hugging Face directories,
  ``.safetensors`` + architecture and GGUF files are streamed one stacked group at a time,
  TorchScript archives and pickled modules converted from their state dict;
- in memory, when the model has to run (calibration, ``--target``) or its generators become LORSA
  layers: converted in place and saved.

A Hugging Face text model asked for a budget or a target without calibration data is calibrated on
the shipped text.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from . import measure as m
from .calibrate.data import CalibrationData
from .calibrate.fidelity import Reference, check_inputs, fidelity, is_causal_lm
from .calibrate.grams import collect_grams
from .calibrate.probes import Probes
from .checkpoint.format import DEFAULT_SHARD_SIZE, source_manifest, stored_manifest
from .checkpoint.writer import save
from .conversion import Progress, calibrated_convert, convert, make_plan, note_calibration
from .convert_weights import convert_weights
from .counting import count_parameters
from .errors import LorsUsageError, about
from .fit import FitOptions
from .io.atomic import check_output
from .io.dist import Dist
from .io.hf import has_tokenizer, is_hf_dir
from .io.memory import own_memory
from .io.sources import SourceInfo, load_source, open_lazy
from .io.spill import Spill
from .options import ConvertOptions, Target
from .report import Report
from .target import FIRST, REFERENCE_KEEP_BYTES, search_budget


@dataclass
class _Job:
    """One ``convert_file`` call: the conversion's options and the file-level ones."""

    src: Path
    out: Path | None
    options: ConvertOptions
    arch: str | None
    trust_pickle: bool
    calibrate: Path | None
    heldout: Path | None
    heldout_fraction: float | None
    target: Target | None
    objective: str
    probes: int | None
    measure: bool
    max_shard_size: int | str
    force: bool
    dist: Dist
    dry_run: bool
    progress: Progress | None
    log: Callable[[str], None] | None

    @functools.cached_property
    def text_model(self) -> bool:  # a GGUF file carries its tokenizer
        return (is_hf_dir(self.src) or self.src.is_file()) and has_tokenizer(self.src)

    @property
    def calibrated(self) -> bool:
        wants_budget = self.options.budget is not None or self.target is not None
        return self.calibrate is not None or (self.text_model and wants_budget)

    def check(self) -> None:
        """Refuse option combinations that depend on the source (whether it is a text model)."""
        if self.options.closed_loop and (self.target is not None or not self.calibrated):
            raise LorsUsageError(
                "--closed-loop refits a calibrated conversion: give --calibrate, or --budget for a text "
                "model (not --target)"
            )
        if self.probes is not None and not self.calibrated:
            raise LorsUsageError(
                "--probes goes with a calibrated conversion: give --calibrate, or --budget or --target "
                "for a text model"
            )

    @property
    def in_memory(self) -> bool:
        return self.calibrated or self.target is not None or self.options.adaptive is not None


def convert_file(
    src: str | Path,
    out: str | Path | None,
    options: ConvertOptions | None = None,
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
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
    **changes,
) -> Report | None:
    """Convert the model at ``src`` into the checkpoint directory ``out`` (atomically) and return the
    report; ``dry_run`` returns the report of the plan and writes nothing.

    ``options`` (changed by keyword arguments) are :func:`lors_convert.convert`'s.
    ``calibrate``/``heldout``: calibration and held-out input files (text for Hugging Face text
    models, else ``.safetensors``/``.pt`` tensors); ``target``: search the smallest budget that keeps
    it; ``measure``: measure fidelity (default). ``log`` receives progress lines. Returns None on
    ``torchrun`` ranks other than 0.
    """
    options = ConvertOptions.of(options, **changes)
    if target is not None and options.budget is not None:
        raise LorsUsageError("--target chooses the budget: give --target or --budget, not both")
    job = _Job(
        src=Path(src),
        out=Path(out) if out is not None else None,
        options=options,
        arch=arch,
        trust_pickle=trust_pickle,
        calibrate=calibrate,
        heldout=heldout,
        heldout_fraction=heldout_fraction,
        target=target,
        objective=objective,
        probes=probes,
        measure=measure,
        max_shard_size=max_shard_size,
        force=force,
        dist=dist or Dist(),
        dry_run=dry_run,
        progress=progress,
        log=log,
    )
    job.check()
    lazy = None if job.in_memory else open_lazy(job.src, arch)
    if lazy is not None:
        model, reader, source = lazy
        with about(job.src):
            manifest = stored_manifest(source_manifest(model), reader)
        if manifest is not None:
            aliases = manifest["aliases"]
            return _weights(
                job, model, reader.get, manifest, source, None, lambda k: reader.get(aliases.get(k, k))
            )
        source.cancel_hash()  # loaded whole below, which hashes it again
    if job.dist.world > 1:
        raise LorsUsageError("distributed conversion needs a Hugging Face directory or .safetensors + --arch")
    model, source = load_source(job.src, arch=arch, trust_pickle=trust_pickle)
    manifest = source_manifest(model, source.stored)
    if not job.in_memory:
        return _weights(job, model, model.state_dict().__getitem__, manifest, source, model)
    if source.kind == "torchscript":
        raise LorsUsageError(
            "--adaptive, --calibrate and --target need a rebuildable model, not a TorchScript archive"
        )
    own_memory(model)  # the weights conversion replaces are then freed
    return _in_memory(job, model, source, manifest)


def _weights(job: _Job, model: nn.Module, get, manifest: dict, source: SourceInfo, loaded, measured_get=None):
    """The weights-only way: ``loaded`` is the source in memory (None: ``model`` is a skeleton whose
    source weights ``measured_get`` reads)."""
    measurer = (
        m.measurer(job.src, job.heldout, job.text_model, loaded, model, measured_get) if job.measure else None
    )
    return convert_weights(
        job.src,
        job.out,
        model,
        get,
        manifest,
        source,
        job.options,
        dist=job.dist,
        dry_run=job.dry_run,
        force=job.force,
        max_shard_size=job.max_shard_size,
        measure=measurer,
        progress=job.progress,
    )


def _in_memory(job: _Job, model: nn.Module, source: SourceInfo, manifest: dict) -> Report:
    """Convert the loaded model in place (calibrated, searched or LORSA), judge it and save it.

    With a CUDA ``--device`` the model runs there too: the text it writes to calibrate on, the Gram
    and fidelity passes and the closed loop; it is saved from the CPU."""
    if job.options.device is not None:
        model.to(job.options.device)
    data, probe = _inputs(job, model)
    if job.out is not None and not job.dry_run:
        check_output(job.out, job.force)  # before the work, not after it
    spill = Spill(near=job.out.parent if job.out is not None else None)  # Grams and reference outputs
    try:
        if job.dry_run:
            return _dry_run(job, model, data, spill)
        if job.target is not None:
            lors_model, report = _search(job, model, data, probe, spill)
        else:
            lors_model, report = _convert_measured(job, model, data, probe, spill)
    finally:
        spill.close()
    m.judge(report, probe)
    save(
        lors_model.to("cpu"),
        job.out,
        report=report,
        source=source,
        manifest=manifest,
        force=job.force,
        max_shard_size=job.max_shard_size,
    )
    return report


def _inputs(job: _Job, model: nn.Module) -> tuple[CalibrationData | None, Probes | None]:
    """The calibration data (when calibrated) and the probes fidelity is measured on (when it is)."""
    data, probe = None, None
    if job.calibrated and job.calibrate is None and job.text_model and is_causal_lm(model):
        data, probe = m.generated_calibration(model, job.src, job.heldout)  # nothing written but OUT
    elif job.calibrated:
        data, probe = m.calibration_data(
            job.calibrate, job.heldout, job.src, job.text_model, job.heldout_fraction
        )
    if data is not None and job.probes is not None:  # --probes: the calibration's own choice replaced
        data = replace(data, probes=job.probes)
    wanted = job.measure or job.target is not None
    if wanted and (probe is None or not probe.batches):
        probe = m.probes_for(job.src, job.heldout, job.text_model, model)
    elif not wanted:
        probe = None
    if probe is not None and probe.batches and job.dry_run:  # --target checks them as its reference
        with about(probe.origin):
            check_inputs(model, probe.batches)
    return data, probe


def _convert_measured(job: _Job, model, data, probe: Probes | None, spill: Spill):
    """Convert in place (calibrated on ``data`` when given) and measure on ``probe``."""
    with about(probe.origin if probe is not None else None):  # also checks the probes run
        reference = m.reference(model, probe, spill)
    if data is not None:  # its own held-out batches are measured only through ``reference``
        return calibrated_convert(
            model,
            replace(data, heldout=[]),
            job.options,
            progress=job.progress,
            objective=job.objective,
            probes=data.probes,
            reference=reference,
            spill=spill,
        )
    with about(job.src):
        lors_model, report = convert(model, job.options, progress=job.progress)
    if reference is not None:
        with about(probe.origin):
            report.quality.update(fidelity(lors_model, reference))
    return lors_model, report


def _grams(job: _Job, model: nn.Module, data: CalibrationData, spill: Spill):
    with about(data.source or None):
        return collect_grams(
            model,
            data.calibration,
            include=job.options.include,
            exclude=job.options.exclude,
            objective=job.objective,
            probes=data.probes,
            spill=spill,
        )


def _search(job: _Job, model, data, probe: Probes | None, spill: Spill):
    if probe is None or not probe.batches:
        raise LorsUsageError(f"--target needs held-out inputs to measure: {probe.why_none if probe else ''}")
    # the search converts copies, so the model itself is the reference; its outputs are made first,
    # which checks the probes before the calibration's work
    reference = Reference(model, probe.batches, probe.label, probe.synthetic, keep_bytes=REFERENCE_KEEP_BYTES)
    with about(probe.origin):
        reference.prime()
    calibration = _grams(job, model, data, spill) if data is not None else None
    with about(job.src):
        best, report, points = search_budget(
            model, reference, job.target, job.options, calibration, job.log, job.progress
        )
    if data is not None:
        note_calibration(report, data, calibration)
    report.quality["target"] = {
        "target": str(job.target),
        "frontier": [p.to_dict(job.target) for p in points],
    }
    return best, report


def _dry_run(job: _Job, model: nn.Module, data: CalibrationData | None, spill: Spill) -> Report:
    """The plan a real in-memory run would make, without fitting: ranks under a budget need the
    Grams, so those are collected (the one expensive step of a dry run)."""
    options = job.options if job.target is None else replace(job.options, budget=FIRST)
    calibration = _grams(job, model, data, spill) if data is not None and options.budget is not None else None
    with about(job.src):
        plan = make_plan(
            model, lambda key: model.get_parameter(key).detach(), FitOptions(options, calibration), {}
        )
    report = plan.report(count_parameters(model))
    if job.target is not None:
        report.warnings.append(
            f"dry run: --target {job.target} searches budgets by converting and measuring; this is "
            f"the plan of its first candidate, budget {FIRST}"
        )
    elif data is not None:
        report.warnings.append(
            "dry run: factors not fitted, so no error or fidelity was measured"
            + (" (the budget's ranks come from the calibration Grams)" if options.budget is not None else "")
        )
    return report


__all__ = ["convert_file"]
