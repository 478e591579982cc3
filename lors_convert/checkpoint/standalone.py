"""Loading a LORS checkpoint of a transformers model with torch, transformers and safetensors only.

This module imports nothing from lors: ``--hf-code`` (:mod:`.hf_code`) copies it verbatim into the
checkpoint's ``modeling_lors.py``, after the source of lors's own layer classes, and the class
:func:`auto_loader` makes is what ``config.json``'s ``auto_map`` names. Its ``from_pretrained``
builds the architecture ``config.json`` names on the meta device, puts the layer classes in place of
the converted modules as ``lors_config.json`` records them, and assigns the tensors of the
safetensors files (memory-mapped, copy-on-write), as ``lors_convert.load`` does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from torch import nn

LORS_CONFIG = "lors_config.json"
BUFFERS = "__buffers__."


def checkpoint_file(path, name: str, **hub) -> str | None:
    """``name`` in a local checkpoint directory or a Hub repository (transformers' cache); None if absent."""
    if os.path.isdir(path):
        found = Path(path) / name
        return str(found) if found.is_file() else None
    from transformers.utils import cached_file

    return cached_file(path, name, _raise_exceptions_for_missing_entries=False, **hub)


def weight_files(path, **hub) -> list[str]:
    index = checkpoint_file(path, "model.safetensors.index.json", **hub)
    if index is None:
        return [checkpoint_file(path, "model.safetensors", **hub)]
    shards = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
    return [checkpoint_file(path, shard, **hub) for shard in shards]


def install(model: nn.Module, lors: dict, layers: dict[str, type]) -> None:
    """Put a LORS layer (empty, on the meta device) in place of every converted module."""
    for stack in lors["stacks"]:
        for entry in stack["params"]:
            if entry["layer"] not in layers:
                raise ValueError(f"{entry['name']}: no standalone code for LORS layer {entry['layer']!r}")
            cls, dtype = layers[entry["layer"]], getattr(torch, entry["dtype"])
            shared = (
                nn.Parameter(torch.empty(*entry["matrix"], device="meta", dtype=dtype))
                if entry["shared"]
                else None
            )
            dense = set(entry.get("dense_members", []))
            for i, member in enumerate(stack["members"]):
                if i in dense:
                    continue
                path = f"{member}.{entry['owner']}" if entry["owner"] else member
                layer = cls(
                    model.get_submodule(path),
                    shared,
                    total_rank=entry["ranks"][i],
                    rank=entry["rank"],
                    groups=entry["groups"][i],
                    **entry.get("extra", {}),
                )
                model.set_submodule(path, layer)


def stored_name(key: str, lors: dict, stored) -> str:
    """The checkpoint name of the model's state-dict ``key``: itself, the first member's shared part,
    or the tensor a tied key aliases."""
    if key in stored:
        return key
    for stack in lors["stacks"]:
        for entry in stack["params"]:
            dense = set(entry.get("dense_members", []))
            kept = [m for i, m in enumerate(stack["members"]) if i not in dense]
            for member in kept:
                prefix = f"{member}.{entry['owner']}."
                rel = key[len(prefix) :]
                if key.startswith(prefix) and rel in entry["shared"]:
                    return f"{kept[0]}.{entry['owner']}.{rel}"
    alias = lors["manifest"]["aliases"].get(key)
    if alias is None:
        raise KeyError(f"the checkpoint has no tensor for {key!r}")
    return alias


def read_tensors(files: list[str]) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in files:
        with safe_open(f, framework="pt", device="cpu") as handle:
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
    return tensors


def fill(model: nn.Module, lors: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Assign every state-dict entry from ``tensors`` and re-tie what the architecture ties."""
    places: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            places.setdefault(id(p), []).append((module, name))
    state = {key: tensors[stored_name(key, lors, tensors)] for key in model.state_dict(keep_vars=True)}
    model.load_state_dict(state, strict=True, assign=True)
    for group in places.values():
        first = getattr(*group[0])
        for module, name in group[1:]:
            setattr(module, name, first)
    for key, t in tensors.items():
        if key.startswith(BUFFERS):
            owner, _, attr = key[len(BUFFERS) :].rpartition(".")
            model.get_submodule(owner).register_buffer(attr, t, persistent=False)


def load_lors(path, layers: dict[str, type], config=None, dtype=None, device=None, **hub) -> nn.Module:
    """The transformers model of the LORS checkpoint at ``path`` with its LORS layers, in eval mode.

    ``layers``: layer kind -> class. Private-only layers whose factored product costs at least the
    dense one run through ``W_i = B_i A_i``, the others hold ``B`` laid out for decoding
    (``prepare_inference``), as ``lors_convert.load`` does."""
    lors = json.loads(Path(checkpoint_file(path, LORS_CONFIG, **hub)).read_text())
    if config is None:
        config = transformers.AutoConfig.from_pretrained(path, **hub)
    name = (getattr(config, "architectures", None) or [""])[0]
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"{path}: config.json names no transformers model class ({name!r})")
    with torch.device("meta"):
        model = cls(config)
    install(model, lors, layers)
    fill(model, lors, read_tensors(weight_files(path, **hub)))
    for module in model.modules():
        if getattr(module, "layer_kind", None) in ("linear", "conv1d"):
            module.prepare_inference()
    if dtype not in (None, "auto"):
        model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    if device is not None:
        model = model.to(device)
    return model.eval()


HUB_KEYS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


def auto_loader(layers: tuple[type, ...]) -> type:
    """The class ``auto_map`` names: transformers calls its ``from_pretrained``, which returns the
    checkpoint's own transformers class (``LlamaForCausalLM``, ``BertModel``, ...) with LORS layers."""

    class LorsPretrainedLoader(transformers.PreTrainedModel):
        config_class = transformers.PretrainedConfig

        @classmethod
        def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
            hub = {k: kwargs[k] for k in HUB_KEYS if kwargs.get(k) is not None}
            dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
            device = kwargs.get("device_map") if isinstance(kwargs.get("device_map"), str) else None
            kinds = {layer.layer_kind: layer for layer in layers}
            return load_lors(pretrained_model_name_or_path, kinds, config, dtype, device, **hub)

    return LorsPretrainedLoader
