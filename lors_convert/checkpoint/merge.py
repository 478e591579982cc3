"""``lors merge``: a LORS checkpoint -> dense weights under exactly the source's keys, shapes and dtypes.

Pure tensor math from the checkpoint alone (each layer class's ``merge_state``), streamed one
converted group at a time into shards planned up front; no architecture is built. A tied tensor is
written under the names the source stored it under (:func:`~.format.merged_keys`). A checkpoint of a
GGUF source also merges into a GGUF file (F32 or F16) with the source's metadata.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ..errors import LorsError, LorsUsageError, short
from ..io.atomic import atomic_output, check_not_input, check_output
from ..io.confine import confined
from ..io.gguf import FILE_TYPE_KEY, Field, GGUFFile, gguf_package, out_tensor, write_gguf
from ..io.gguf_model import METADATA_NAME, GGUFLayout
from ..io.safetensors import SafetensorsFile, ShardedWriter, meta_like
from ..layers import layer_class
from .format import DEFAULT_SHARD_SIZE, dtype_name, merged_keys
from .hf_code import strip_hf_code
from .reader import Checkpoint

FORMATS = ("hf", "gguf")
GGUF_TYPES = ("f32", "f16")


def merged_tensors(ckpt: Checkpoint, progress=None) -> Iterator[tuple[str, torch.Tensor]]:
    """Dense ``(key, tensor)`` pairs with exactly the source's keys, one converted group at a time."""
    manifest = ckpt.manifest
    wanted = set(merged_keys(manifest))
    owners = ckpt.owner_prefixes()
    groups = [(s, e) for s in ckpt.stacks for e in s["params"]]
    steps = iter(groups)
    if progress is not None:
        steps = progress(steps, len(groups), "merging")
    for stack, entry in steps:
        cls = layer_class(entry["layer"])
        for i, member in enumerate(stack["members"]):
            if i in entry.get("dense_members", []):
                continue  # kept dense: its tensors are copied below, as stored
            prefix = f"{member}.{entry['owner']}."
            try:
                dense = cls.merge_state(ckpt.owner_state(stack, entry, i), entry)
            except (KeyError, RuntimeError, ValueError) as e:
                raise LorsError(f"{ckpt.path}: cannot merge {prefix}{entry['attr']} ({short(e)})") from None
            for rel, t in dense.items():  # yielded at once: one layer's tensors in memory, not the group's
                yield prefix + rel, _checked(ckpt, prefix + rel, t)
            del dense
    for key in manifest["keys"]:
        if key not in wanted or any(key.startswith(p) for p in owners):
            continue
        source = manifest["aliases"].get(key, key)
        if any(source.startswith(p) for p in owners):
            continue
        tensor = ckpt.get(source)
        if (
            source != key
        ):  # an alias: safe_open may hand out the same memory twice, safetensors stores no aliases
            tensor = tensor.clone()
        yield key, _checked(ckpt, key, tensor)


def merged_getter(ckpt: Checkpoint) -> Callable[[str], torch.Tensor]:
    """``get(key)``: one dense tensor of the merged model, merged from its layer's factors alone
    (for running the conversion block by block, :mod:`lors_convert.calibrate.streamed`)."""
    owners = ckpt.owner_prefixes()
    aliases = ckpt.manifest["aliases"]

    def get(key: str) -> torch.Tensor:
        for prefix, (stack, entry, i) in owners.items():
            if key.startswith(prefix):
                dense = layer_class(entry["layer"]).merge_state(ckpt.owner_state(stack, entry, i), entry)
                return _checked(ckpt, key, dense[key[len(prefix) :]])
        return ckpt.get(aliases.get(key, key))

    return get


def _checked(ckpt: Checkpoint, key: str, t: torch.Tensor) -> torch.Tensor:
    spec = ckpt.manifest["keys"].get(key)
    if spec is None:
        raise LorsError(f"{ckpt.path}: merge produced {key!r}, which the source did not have")
    if list(t.shape) != list(spec["shape"]) or dtype_name(t.dtype) != spec["dtype"]:
        raise LorsError(
            f"{ckpt.path}: {key!r} merges to {list(t.shape)} {dtype_name(t.dtype)}, "
            f"the source had {spec['shape']} {spec['dtype']}"
        )
    return t


def merge_checkpoint(
    path: str | Path,
    out: str | Path,
    force: bool = False,
    progress=None,
    max_shard_size: int | str = DEFAULT_SHARD_SIZE,
    format: str | None = None,
    gguf_type: str = "f32",
) -> Path:
    """``lors merge``: dense weights under the source's keys; for an HF or GGUF source a directory
    transformers loads. ``format="gguf"`` (the default for an ``out`` ending in ``.gguf``) writes a
    GGUF file of ``gguf_type`` ("f32" or "f16") instead: a GGUF source only."""
    format = format or ("gguf" if Path(out).suffix.lower() == ".gguf" else "hf")
    if format not in FORMATS:
        raise LorsUsageError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    if gguf_type not in GGUF_TYPES:
        raise LorsUsageError(f"--outtype must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")
    ckpt = Checkpoint(path)
    out = Path(out)
    check_not_input(out, Path(path))
    check_output(out, force)
    metadata = {"format": "pt"}
    if format == "gguf":
        return _merge_gguf(ckpt, out, gguf_type, force, progress)
    if out.suffix == ".safetensors":  # one file, also streamed: each tensor goes into its place
        with atomic_output(out, force, directory=False) as tmp:
            writer = SafetensorsFile(tmp, merge_spec(ckpt), metadata)
            for key, t in merged_tensors(ckpt, progress):
                writer.add(key, t)
            if writer.pending:
                raise LorsError(f"{ckpt.path}: merge could not produce {sorted(writer.pending)[0]!r}")
        return out
    with atomic_output(out, force) as tmp:  # streamed: each tensor is written as its group is merged
        writer = ShardedWriter(tmp, merge_spec(ckpt), max_shard_size, metadata)
        for key, t in merged_tensors(ckpt, progress):
            writer.add(key, t)
        writer.close()
        if ckpt.source.get("kind") in ("hf", "gguf"):
            for name in ckpt.side_files():
                if name != METADATA_NAME:  # a GGUF source's metadata: not part of a transformers directory
                    shutil.copy2(confined(ckpt.path, name, "side file"), tmp / name)
            strip_hf_code(tmp)  # the dense model runs transformers' own code
    return out


def _merge_gguf(ckpt: Checkpoint, out: Path, gguf_type: str, force: bool, progress) -> Path:
    """A GGUF file: the source's metadata (file type set to F32/F16) and tensors, merged ones in
    ``gguf_type`` (1-D ones always F32, as llama.cpp writes them), streamed as merged."""
    if ckpt.source.get("kind") != "gguf" or not (ckpt.path / METADATA_NAME).is_file():
        raise LorsUsageError(
            f"{ckpt.path}: --format gguf needs a checkpoint converted from a GGUF file "
            f"(its metadata and tokenizer come from the source); merge to a directory instead"
        )
    gguf = gguf_package()
    source = GGUFFile(ckpt.path / METADATA_NAME)
    spec = merge_spec(ckpt)
    layout = GGUFLayout(source.architecture, source.values, spec)
    names = {}
    for key in spec:
        if key not in layout.to_gguf_name:
            raise LorsError(f"{ckpt.path}: {key!r} has no GGUF tensor name in {source.architecture!r}")
        names[key] = layout.to_gguf_name[key]
    stored = {k: ("F16" if gguf_type == "f16" and t.dim() >= 2 else "F32") for k, t in spec.items()}
    tensors = [out_tensor(names[k], tuple(t.shape), stored[k]) for k, t in spec.items()]
    tensors += [out_tensor(n, e.shape, e.type_name) for n, e in source.tensors.items()]  # rope_freqs & co
    file_type = gguf.LlamaFileType.MOSTLY_F16 if gguf_type == "f16" else gguf.LlamaFileType.ALL_F32
    fields = [Field(f.key, int(file_type), f.vtype) if f.key == FILE_TYPE_KEY else f for f in source.fields]

    def data():
        for key, t in merged_tensors(
            ckpt, progress
        ):  # (rows, ...) as the model holds it -> as llama.cpp stores it
            yield names[key], layout.to_file(names[key], t.float()).numpy()
        for name in source.tensors:
            yield name, source.raw(name)

    with atomic_output(out, force, directory=False) as tmp:
        write_gguf(tmp, source.architecture, fields, tensors, data())
    return out


def merge_spec(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """Meta tensors of the dense output in the order :func:`merged_tensors` produces them."""
    keys = {k: ckpt.manifest["keys"][k] for k in merged_keys(ckpt.manifest)}
    order: list[str] = []
    for stack in ckpt.stacks:
        for entry in stack["params"]:
            for member in stack["members"]:
                prefix = f"{member}.{entry['owner']}."
                order.extend(k for k in keys if k.startswith(prefix))
    placed = set(order)
    order.extend(k for k in keys if k not in placed)
    return {k: meta_like(keys[k]["shape"], getattr(torch, keys[k]["dtype"])) for k in order}
