"""What a file conversion is measured on, and its verdict: the held-out inputs (the calibration
data's held-out part, ``--heldout``, or the probes that fit the model), the source's outputs on
them, the fidelity of a written checkpoint, and the report's judgement of it.

Fidelity (:mod:`lors_convert.calibrate.fidelity`) is measured by default, on ``--heldout``, else the
held-out part of the calibration data, else the probes that fit the model
(:mod:`lors_convert.calibrate.probes`); when it cannot be, the report says why.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .calibrate.data import CalibrationData, check_data_file, load_calibration
from .calibrate.fidelity import Reference, fidelity, fidelity_problems, reference_outputs
from .calibrate.generated import (
    CALIBRATION_LEN,
    CALIBRATION_PROBES,
    CALIBRATION_SEQUENCES,
    calibration_batches,
)
from .calibrate.probes import CALIBRATION_TEXT, PROBE_LABEL, PROBE_TEXT, Probes, default_probes, read_probes
from .calibrate.streamed import lockstep
from .checkpoint.merge import merged_getter, merged_tensors
from .checkpoint.reader import Checkpoint
from .errors import LorsUsageError, about
from .io.hf import load_tokenizer
from .io.spill import Spill
from .report import Report

NEXT_STEPS = "try --calibrate DATA, a larger --budget or --target, or lors heal"

Getter = Callable[[str], torch.Tensor]


def calibration_data(
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
        label = PROBE_LABEL if heldout == PROBE_TEXT else f"{heldout.name} (--heldout)"
    else:
        label = f"held-out {data.n_heldout} samples of {path.name}"
    return data, Probes(data.heldout, label, origin=data.heldout_origin)


def generated_calibration(
    model: nn.Module, src: Path, heldout: Path | None
) -> tuple[CalibrationData, Probes]:
    """A causal LM's default calibration data: text the model writes (seed 0, so the same on every
    run), held out: ``--heldout``, else the shipped probe text."""
    if heldout is not None:
        check_data_file(heldout, "held-out data")
    batches = calibration_batches(model, load_tokenizer(src))
    probe = probes_for(src, heldout, True, model)
    tokens = CALIBRATION_SEQUENCES * CALIBRATION_LEN
    data = CalibrationData(
        batches,
        probe.batches,
        "text",
        f"{tokens} tokens written by the source model (seed 0)",
        CALIBRATION_SEQUENCES,
        sum(int(b["input_ids"].shape[0]) for b in probe.batches),
        str(heldout or PROBE_TEXT),
        probes=CALIBRATION_PROBES,
    )
    return data, probe


def probes_for(src: Path, heldout: Path | None, text_model: bool, model) -> Probes:
    """``--heldout``'s inputs, else the probes that fit the model."""
    if heldout is not None:
        return read_probes(heldout, src if text_model else None)
    return default_probes(src if text_model else None, getattr(model, "config", None))


def reference(model: nn.Module, probe: Probes | None, spill: Spill) -> Reference | None:
    """The source's outputs on the probes, recorded on ``spill`` (not a second model in memory)."""
    if probe is None or not probe.batches:
        return None
    return reference_outputs(model, probe.batches, probe.label, probe.synthetic, spill=spill)


def judge(report: Report, probe: Probes | None, why_not: str | None = None) -> None:
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


def measurer(
    src: Path,
    heldout: Path | None,
    text_model: bool,
    loaded: nn.Module | None,
    structure: nn.Module,
    get: Getter | None = None,
) -> Callable[[Path, Report], None]:
    """A function measuring a written checkpoint against its source and judging it in the report.
    ``loaded``: the source model in memory; else the skeleton ``structure`` runs block by block, its
    weights read through ``get`` (the source) and from the checkpoint (the conversion): one block in
    memory at a time."""

    def measure(checkpoint_dir: Path, report: Report) -> None:
        probe = probes_for(src, heldout, text_model, structure)
        if probe.batches:
            ckpt = Checkpoint(checkpoint_dir)
            spill = Spill(near=checkpoint_dir.parent)  # the source's outputs
            try:
                with about(probe.origin):
                    report.quality.update(_checkpoint_fidelity(ckpt, probe, spill, loaded, structure, get))
            finally:
                spill.close()
        judge(report, probe)

    return measure


def _checkpoint_fidelity(ckpt: Checkpoint, probe: Probes, spill: Spill, loaded, structure, get) -> dict:
    """The fidelity of ``ckpt`` against its source on ``probe``: the source in memory merged with the
    checkpoint's weights, or the skeleton run in lock-step over the source's then the checkpoint's."""
    batches, label, synthetic = probe.batches, probe.label, probe.synthetic
    if loaded is not None:
        ref = reference_outputs(loaded, batches, label, synthetic, spill=spill)
        return fidelity(merge_into(loaded, ckpt), ref)
    run_source = functools.partial(lockstep, structure, get)
    ref = reference_outputs(structure, batches, label, synthetic, spill=spill, run=run_source)
    return fidelity(structure, ref, run=functools.partial(lockstep, structure, merged_getter(ckpt)))


@torch.no_grad()
def merge_into(source: nn.Module, ckpt: Checkpoint) -> nn.Module:
    """``source`` with its converted weights replaced, in place, by the checkpoint's merged ones."""
    owners = tuple(ckpt.owner_prefixes())
    params = dict(source.state_dict(keep_vars=True))
    for key, t in merged_tensors(ckpt):
        if not key.startswith(owners):
            break  # the converted groups come first; the rest is the source's own
        params[key].copy_(t)
    return source


__all__ = ["NEXT_STEPS", "calibration_data", "probes_for", "reference", "judge", "measurer", "merge_into"]
