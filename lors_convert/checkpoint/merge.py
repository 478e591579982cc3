"""``lors merge``: a LORS checkpoint -> dense weights under exactly the source's keys, shapes and dtypes.

Pure tensor math from the checkpoint alone (each layer class's ``merge_state``), streamed one
converted group at a time into shards planned up front; no architecture is built.
"""
from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from ..discover.plan import dtype_name
from ..errors import LorsError, short
from ..io.atomic import atomic_output, check_not_input, check_output
from ..io.confine import confined
from ..io.safetensors import INDEX_NAME, WEIGHTS_NAME, ShardedWriter, meta_like
from ..layers import layer_class
from .format import CONFIG_NAME, DEFAULT_SHARD_SIZE, REPORT_NAME, alias_map
from .reader import Checkpoint



def merged_tensors(ckpt: Checkpoint, progress=None) -> Iterator[tuple[str, torch.Tensor]]:
    """Dense ``(key, tensor)`` pairs with exactly the source's keys, one converted group at a time."""
    manifest = ckpt.manifest
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
        if any(key.startswith(p) for p in owners):
            continue
        source = manifest["aliases"].get(key, key)
        if any(source.startswith(p) for p in owners):
            continue
        tensor = ckpt.get(source)
        if source != key:  # an alias: safe_open may hand out the same memory twice, safetensors stores no aliases
            tensor = tensor.clone()
        yield key, _checked(ckpt, key, tensor)


def _checked(ckpt: Checkpoint, key: str, t: torch.Tensor) -> torch.Tensor:
    spec = ckpt.manifest["keys"].get(key)
    if spec is None:
        raise LorsError(f"{ckpt.path}: merge produced {key!r}, which the source did not have")
    if list(t.shape) != list(spec["shape"]) or dtype_name(t.dtype) != spec["dtype"]:
        raise LorsError(f"{ckpt.path}: {key!r} merges to {list(t.shape)} {dtype_name(t.dtype)}, "
                        f"the source had {spec['shape']} {spec['dtype']}")
    return t


def merge_checkpoint(path: str | Path, out: str | Path, force: bool = False, progress=None,
                     max_shard_size: int | str = DEFAULT_SHARD_SIZE) -> Path:
    """``lors merge``: dense weights under the source's keys; for an HF source a loadable directory."""
    ckpt = Checkpoint(path)
    out = Path(out)
    check_not_input(out, Path(path))
    check_output(out, force)
    metadata = {"format": "pt"}
    if out.suffix == ".safetensors":  # one file: safetensors needs every tensor at once
        from safetensors.torch import save_file

        dense = _clone_aliases(dict(merged_tensors(ckpt, progress)))
        missing = [k for k in ckpt.manifest["keys"] if k not in dense]
        if missing:
            raise LorsError(f"{ckpt.path}: merge could not produce {missing[0]!r}")
        with atomic_output(out, force, directory=False) as tmp:
            save_file({k: dense[k].contiguous() for k in ckpt.manifest["keys"]}, str(tmp), metadata=metadata)
        return out
    with atomic_output(out, force) as tmp:  # streamed: shards are written as their groups are merged
        writer = ShardedWriter(tmp, merge_spec(ckpt), max_shard_size, metadata)
        for key, t in merged_tensors(ckpt, progress):
            writer.add(key, t)
        writer.close()
        if ckpt.source.get("kind") == "hf":
            for f in sorted(ckpt.path.iterdir()):
                if f.is_file() and f.name not in (CONFIG_NAME, REPORT_NAME, WEIGHTS_NAME, INDEX_NAME) \
                        and not f.name.endswith(".safetensors"):
                    shutil.copy2(confined(ckpt.path, f.name, "side file"), tmp / f.name)
    return out


def merge_spec(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """Meta tensors of the dense output in the order :func:`merged_tensors` produces them."""
    keys = ckpt.manifest["keys"]
    order: list[str] = []
    for stack in ckpt.stacks:
        for entry in stack["params"]:
            for member in stack["members"]:
                prefix = f"{member}.{entry['owner']}."
                order.extend(k for k in keys if k.startswith(prefix))
    placed = set(order)
    order.extend(k for k in keys if k not in placed)
    return {k: meta_like(keys[k]["shape"], getattr(torch, keys[k]["dtype"])) for k in order}


def _clone_aliases(dense: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors stores no aliases: give tied keys their own copy."""
    for name in alias_map(dense):
        dense[name] = dense[name].clone()
    return dense
