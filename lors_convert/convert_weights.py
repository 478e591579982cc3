"""A conversion from weights alone into a checkpoint: no model run, one stacked group in memory.

:func:`convert_weights` is the weights-only way of ``lors convert``: the model gives the structure
(meta tensors or real ones), a getter the stored tensors; the loop
(:func:`lors_convert.conversion.run_plan`) fits each planned parameter and the
:class:`~lors_convert.checkpoint.CheckpointWriter` writes its factors as they come, the untouched
tensors first. ``torchrun`` ranks each write their shards; rank 0 gathers the errors, measures the
finished checkpoint and renames it into place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .checkpoint.format import BUFFER_PREFIX, REPORT_NAME, nonpersistent_buffers, plan_stacks
from .checkpoint.writer import CheckpointWriter
from .conversion import Getter, Progress, finish_report, make_plan, run_plan
from .counting import count_parameters
from .discover.plan import ConversionPlan
from .errors import LorsUsageError, about
from .fit import FitOptions
from .io.atomic import atomic_output, check_output
from .io.dist import Dist
from .io.safetensors import dump_json
from .io.sources import SourceInfo, refuse_non_finite
from .options import ConvertOptions
from .report import MatrixReport, Report

Measure = Callable[[Path, Report], None]


def convert_weights(
    src: Path,
    out: Path | None,
    model: nn.Module,
    get: Getter,
    manifest: dict,
    source: SourceInfo,
    options: ConvertOptions,
    *,
    dist: Dist,
    dry_run: bool,
    force: bool,
    max_shard_size,
    measure: Measure | None,
    progress: Progress | None = None,
) -> Report | None:
    """Convert from weights alone into the checkpoint ``out``: ``model`` gives the structure, ``get``
    the stored tensors (``manifest``: their keys, shapes and dtypes); ``measure(dir, report)`` adds
    fidelity before the rename. ``dry_run`` returns the plan's report. None on ranks other than 0."""
    if options.adaptive is not None:
        raise LorsUsageError("adaptive and calibrated conversions run on the in-memory model")
    fit, shared_parts = FitOptions(options), {}
    with about(src):
        plan = make_plan(model, get, fit, shared_parts)
    for pp in plan.params:  # the stored dtype, not a meta model's default
        pp.param = replace(pp.param, dtype=getattr(torch, manifest["keys"][pp.keys[0]]["dtype"]))
    report, matrices = plan.report_with_matrices(count_parameters(model))
    if dry_run:
        source.cancel_hash()
        return report
    if dist.is_main:
        check_output(out, force)
    source.finish_hash()  # started when the source was opened (io/digest.py)
    job = _Writing(src, plan, get, fit, shared_parts, report, matrices, source, manifest, dist, progress)
    job.buffers = nonpersistent_buffers(model)
    if not dist.is_main:
        measured = job.write(Path(dist.broadcast(None)), max_shard_size, None)
        dist.barrier()
        dist.gather(measured)
        return None
    with atomic_output(out, force) as tmp:
        dist.broadcast(str(tmp))
        job.write(tmp, max_shard_size, measure)
    return report


@dataclass
class _Writing:
    """One weights-only conversion being written: the plan, where its tensors come from, its report."""

    src: Path
    plan: ConversionPlan
    get: Getter
    fit: FitOptions
    shared_parts: dict
    report: Report
    matrices: list[MatrixReport]
    source: SourceInfo
    manifest: dict
    dist: Dist
    progress: Progress | None
    buffers: dict | None = None

    @property
    def untouched(self) -> list[str]:
        """The stored keys the conversion leaves as they are (a member kept dense among them)."""
        converted = {key for pp in self.plan.params for key in pp.converted_keys}
        aliases = self.manifest["aliases"]
        return [k for k in self.manifest["keys"] if k not in converted and k not in aliases]

    def specs(self, untouched: list[str]) -> dict[str, tuple]:
        """Shape and dtype of every tensor the checkpoint will hold."""
        keys = self.manifest["keys"]
        specs = {
            key: (tuple(shape), pp.param.dtype) for pp in self.plan.params for key, shape in pp.tensor_specs()
        }
        specs.update({k: (tuple(keys[k]["shape"]), getattr(torch, keys[k]["dtype"])) for k in untouched})
        specs.update({BUFFER_PREFIX + name: (tuple(b.shape), b.dtype) for name, b in self.buffers.items()})
        return specs

    def write(self, tmp: Path, max_shard_size, measure: Measure | None) -> dict[int, tuple]:
        """Write this rank's shards into ``tmp``; on rank 0 also the gathered report, measured.
        Returns the errors this rank measured, by plan index."""
        untouched = self.untouched
        stacks = plan_stacks(self.plan)
        writer = CheckpointWriter(
            tmp, stacks, self.source, self.manifest, self.specs(untouched), max_shard_size, self.dist
        )
        self._put_untouched(writer, untouched)
        with about(self.src):
            fits = run_plan(
                self.plan,
                self.get,
                writer,
                self.fit,
                self.matrices,
                self.progress,
                self.shared_parts,
                only=writer.wants,
            )
        measured = {i: (f.relative_error, f.retained_energy) for i, f in fits.items()}
        if not self.dist.is_main:
            writer.shards.close()
            return measured
        self._gather(measured)
        finish_report(self.report, self.plan, self.fit, fits)
        writer.close(self.report)
        if measure is not None:  # on the finished checkpoint, before it is renamed into place
            measure(tmp, self.report)
            (tmp / REPORT_NAME).write_text(dump_json(self.report.to_dict()))
        return measured

    def _put_untouched(self, writer: CheckpointWriter, untouched: list[str]) -> None:
        # the untouched tensors first, each read and written alone: after the groups, the freed heap
        # of a stacked group (kept by the allocator) would add to an embedding's pages
        for key in untouched:
            if writer.shards.wants(key):
                t = self.get(key)
                refuse_non_finite(t, key, self.src)
                writer.put_tensor(key, t)
                del t
        for name, b in self.buffers.items():
            writer.put_tensor(BUFFER_PREFIX + name, b)

    def _gather(self, measured: dict) -> None:
        """Every rank's measured errors into the report's matrix rows (rank 0)."""
        self.dist.barrier()
        for part in self.dist.gather(measured):
            for i, (errors, energies) in part.items():
                self.matrices[i].relative_error, self.matrices[i].retained_energy = errors, energies


__all__ = ["convert_weights"]
