"""Writing a LORS checkpoint directory: one writer for in-memory models and streamed conversions.

:class:`CheckpointWriter` knows the whole output (every tensor's name, shape and dtype) before any
tensor is computed; the conversion loop hands it each fitted parameter (:meth:`put`) and the
untouched tensors (:meth:`put_tensor`), and it writes shards as they complete. :func:`save` writes a
converted in-memory model through the same writer, so both paths give the same files.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ..discover.plan import ParamPlan
from ..errors import LorsError
from ..fit import Fit
from ..io.atomic import atomic_output
from ..io.confine import confined
from ..io.dist import Dist
from ..io.safetensors import INDEX_NAME, ShardedWriter, dump_json, meta_like
from ..io.sources import SourceInfo
from ..report import Report
from .format import (
    BUFFER_PREFIX,
    CONFIG_NAME,
    DEFAULT_SHARD_SIZE,
    REPORT_NAME,
    alias_map,
    build_config,
    dedup_state,
    dtype_name,
    lors_members,
    model_stacks,
    nonpersistent_buffers,
)

TensorSpec = tuple[tuple[int, ...], torch.dtype]


@dataclass
class Origin:
    """What :func:`save` records for a model unless told otherwise: a loaded model's checkpoint
    (``model.lors_origin``, set by ``load``), or what an in-memory conversion knew of its source."""

    source: SourceInfo | None = None
    manifest: dict | None = None
    files_dir: Path | None = None  # the side files (config, tokenizer) are copied from here
    report: Report | None = None

    def saved_report(self) -> Report | None:
        """The report saved again: its savings hold while the ranks do; its fidelity was measured on
        the weights the model had when it was converted or last saved."""
        if self.report is None or not self.report.quality or self.files_dir is None:
            return self.report
        note = (
            f"the fidelity figures are those of {self.files_dir}, which this model was loaded from; "
            "changes made to it since are not measured"
        )
        return replace(self.report, warnings=[*self.report.warnings, note])


def checkpoint_order(stacks: list[dict], keys: Iterable[str]) -> list[str]:
    """The order tensors are laid out in shards: LORS tensors stack by stack and parameter by
    parameter (shared first, then each member's), then every other key in the given order."""
    keys = list(keys)
    present = set(keys)
    first: list[str] = []
    for stack in stacks:
        for entry in stack["params"]:
            owners = [f"{m}.{entry['owner']}." for m in lors_members(stack, entry)]
            first += [owners[0] + name for name in entry["shared"]]
            for owner in owners:
                if entry["kind"] == "static":
                    first += [owner + "lors_B", owner + "lors_A"]
                else:
                    first += [k for k in keys if k.startswith(owner + "lors_")]
    first = [k for k in dict.fromkeys(first) if k in present]
    placed = set(first)
    return first + [k for k in keys if k not in placed]


class CheckpointWriter:
    """Writes a checkpoint's tensors into ``directory`` (a temporary one) and, on :meth:`close`, its
    config and report. Under ``torchrun`` each rank writes its share of the shards and only the
    main process writes the rest.
    """

    def __init__(
        self,
        directory: Path,
        stacks: list[dict],
        source: SourceInfo,
        manifest: dict,
        tensors: dict[str, TensorSpec],
        max_shard_size: int | str = DEFAULT_SHARD_SIZE,
        dist: Dist | None = None,
    ):
        self.directory = Path(directory)
        self.source = source
        self.config = build_config(stacks, source, manifest)
        self.dist = dist or Dist()
        spec = {key: meta_like(*tensors[key]) for key in checkpoint_order(stacks, tensors)}
        # one metadata key: safetensors writes several in a different order in every process
        self.shards = ShardedWriter(
            self.directory,
            spec,
            max_shard_size,
            {"lors_config": dump_json(self.config, indent=None)},
            self.dist,
        )

    def wants(self, pp: ParamPlan) -> bool:
        """Whether this process writes any tensor of ``pp`` (always, outside torchrun)."""
        return any(self.shards.wants(key) for key, _ in pp.tensor_specs())

    def put(self, pp: ParamPlan, fit: Fit) -> None:
        """A fitted static parameter: its shared part (if any), then each member's ``B`` and ``A``."""
        if pp.kind != "static":
            raise LorsError(f"{pp.relname}: adaptive layers need the in-memory path")
        specs = pp.tensor_specs()

        def write(t: torch.Tensor) -> None:
            key, _ = next(specs, (None, None))
            if key is None:
                raise LorsError(f"internal: {pp.relname}: the fit has more tensors than the plan")
            self.put_tensor(key, t.to(device="cpu", dtype=pp.param.dtype))

        if pp.has_shared:
            write(fit.shared)
        for factors in fit.factors:  # written as they come: an iterated fit holds one layer's
            for t in factors or ():  # None: a member kept dense
                write(t)
        if next(specs, None) is not None:
            raise LorsError(f"internal: {pp.relname}: the fit has fewer tensors than the plan")

    def put_tensor(self, key: str, tensor: torch.Tensor) -> None:
        self.shards.add(key, tensor)

    def close(self, report: Report, files_dir: Path | None = None) -> None:
        """Finish the shards; the main process writes the index, config, report and the source's side
        files (copied from ``files_dir``, default the source directory; or produced from a GGUF source)."""
        self.shards.close()
        if not self.dist.is_main:
            return
        report.warnings += self.source.write_files(self.directory, files_dir)
        (self.directory / CONFIG_NAME).write_text(dump_json(self.config))
        (self.directory / REPORT_NAME).write_text(dump_json(report.to_dict()))


def save(
    model: nn.Module,
    out: str | Path,
    report: Report | None = None,
    source: SourceInfo | None = None,
    manifest: dict | None = None,
    force: bool = False,
    max_shard_size: int | str = DEFAULT_SHARD_SIZE,
    files_dir: Path | None = None,
    keep_files: bool = False,
) -> Path:
    """Write a converted model as a LORS checkpoint directory (atomically).

    ``manifest`` is the source's state-dict manifest (``source_manifest`` of the dense model,
    taken before conversion); without it it is reconstructed from the LORS layers. HF side files
    come from ``files_dir`` or the source directory. What is not given comes from
    ``model.lors_origin`` (:class:`Origin`), so a loaded, fine-tuned model saves with its source,
    manifest, side files and report. ``keep_files``: files of a replaced ``out`` that the
    checkpoint does not write (a tokenizer saved there) are kept, weight files excepted.
    """
    stacks = model_stacks(model)
    if not stacks:
        raise LorsError("the model has no LORS layers: convert it first")
    origin = getattr(model, "lors_origin", None) or Origin()
    if files_dir is None and origin.files_dir is not None and not origin.files_dir.is_dir():
        raise LorsError(
            f"{origin.files_dir}, the checkpoint this model was loaded from, is gone: its side files "
            "(config, tokenizer) cannot be copied; pass files_dir="
        )
    manifest = manifest or origin.manifest or _manifest_from_lors(model, stacks)
    source = source or origin.source or SourceInfo(kind="module")
    report = report or origin.saved_report()
    files_dir = files_dir or origin.files_dir
    state = dedup_state(model.state_dict(keep_vars=True))
    state.update({BUFFER_PREFIX + k: v for k, v in nonpersistent_buffers(model).items()})
    out = Path(out)
    with atomic_output(out, force) as tmp:
        writer = CheckpointWriter(
            tmp,
            stacks,
            source,
            manifest,
            {k: (tuple(t.shape), t.dtype) for k, t in state.items()},
            max_shard_size,
        )
        for key, t in state.items():
            writer.put_tensor(key, t)
        writer.close(report or Report(), files_dir)
        if keep_files and out.is_dir():
            _keep_files(out, tmp)
    return out


def _keep_files(old: Path, new: Path) -> None:
    """Copy the plain files of ``old`` that ``new`` lacks into it (not weights: they would be stale)."""
    for f in old.iterdir():
        name = f.name
        if name.endswith(".safetensors") or name == INDEX_NAME or (new / name).exists():
            continue
        path = confined(old, name, "file")
        if path.is_file() and not path.is_symlink():
            shutil.copy2(path, new / name)


def _manifest_from_lors(model: nn.Module, stacks: list[dict]) -> dict:
    """Dense keys of a converted model: LORS owners give back ``<owner>.<attr>`` in place of factors."""
    dense_model_keys: dict[str, dict] = {}
    lors_state = model.state_dict(keep_vars=True)
    owners = {}
    for stack in stacks:
        for entry in stack["params"]:
            for member in lors_members(stack, entry):
                owners[f"{member}.{entry['owner']}."] = entry
    for name, t in lors_state.items():
        prefix = next((p for p in owners if name.startswith(p)), None)
        if prefix is None:
            dense_model_keys[name] = {"shape": list(t.shape), "dtype": dtype_name(t.dtype)}
            continue
        entry = owners[prefix]
        weight_key = prefix + entry["attr"]
        dense_model_keys.setdefault(weight_key, {"shape": entry["shape"], "dtype": entry["dtype"]})
        rel = name[len(prefix) :]
        if not rel.startswith("lors_") and rel not in entry["shared"]:  # factors are not dense keys
            dense_model_keys[name] = {"shape": list(t.shape), "dtype": dtype_name(t.dtype)}
    aliases = alias_map({name: t for name, t in lors_state.items() if name in dense_model_keys})
    # the state dict is the source: it has every name of a tie
    return {"keys": dense_model_keys, "aliases": aliases, "stored_aliases": list(aliases)}
