"""Loading a runnable, trainable LORS model: the recorded architecture on the meta device, LORS
layers installed from the config, then filled from the checkpoint; the model remembers where it
came from, so saving it writes a LORS checkpoint again."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ..discover.stacks import Stack
from ..errors import LorsError, LorsUsageError, short
from ..io.hf import build_hf
from ..io.sources import SourceInfo, build_arch, load_source
from ..layers import LorsConv1D, LorsLinear, meta_clone
from ..swap import install_layers
from .format import BUFFER_PREFIX, lors_members, plan_from_entry
from .pretrained import enable_save_pretrained
from .reader import Checkpoint
from .writer import Origin

log = logging.getLogger("lors_convert")

TRUSTED_ARCH_PREFIX = "lors_convert.zoo."  # our own reference models: safe to build from a recorded name


def build_architecture(
    ckpt: Checkpoint, trust_pickle: bool = False, arch: str | None = None, trust_arch: bool = False
) -> nn.Module:
    """The dense architecture the checkpoint came from, on the meta device.

    A state-dict source records its ``--arch`` reference; importing and calling it runs code named in
    the file, so it is used only when the caller passes it again (``arch=``), opts in with
    ``trust_arch=True``, or it names one of lors's own zoo models.
    """
    source = ckpt.source
    kind = source.get("kind")
    if kind in ("hf", "gguf"):  # a GGUF source's config.json was written from its metadata at conversion
        if not (ckpt.path / "config.json").is_file():
            raise LorsError(
                f"{ckpt.path}: the checkpoint of a {kind} source has no config.json to rebuild it from"
            )
        return build_hf(ckpt.path, device="meta", keys=set(ckpt.config["manifest"]["keys"]))
    if kind == "state_dict":
        recorded = source["arch"]
        if arch is None:
            if not (trust_arch or str(recorded).startswith(TRUSTED_ARCH_PREFIX)):
                raise LorsError(
                    f"{ckpt.path}: the checkpoint names the architecture {recorded!r}; calling it "
                    f"runs code named in the file: pass arch={recorded!r} (or trust_arch=True) "
                    "if you trust it, or the dense model as model="
                )
            arch = recorded
        return build_arch(arch, device="meta")
    if kind == "pickle":
        if not source.get("path") or not Path(source["path"]).is_file():
            raise LorsError(
                f"{ckpt.path}: converted from a pickled module ({source.get('path')}), which is "
                "needed to rebuild the architecture and is not there"
            )
        model, _ = load_source(source["path"], trust_pickle=trust_pickle)
        return model
    if kind == "torchscript":
        raise LorsError(
            f"{ckpt.path}: a TorchScript source cannot be rebuilt as a runnable LORS model; "
            "use `lors merge` to get dense weights"
        )
    raise LorsError(
        f"{ckpt.path}: source kind {kind!r} records no architecture; "
        "pass the dense model: load(path, model=...)"
    )


MATERIALIZE = ("auto", "never")


def load(
    path: str | Path,
    model: nn.Module | None = None,
    arch: str | None = None,
    trust_arch: bool = False,
    trust_pickle: bool = False,
    device: str | torch.device = "cpu",
    materialize: str = "auto",
) -> nn.Module:
    """A runnable, trainable LORS model from a checkpoint.

    The architecture comes from the recorded source (see :func:`build_architecture` for when a
    recorded ``--arch`` is used), or ``arch`` ("pkg.module:callable"), or ``model`` (a dense instance
    of it, whose weights are not used); it is built on the meta device and filled from the checkpoint.
    The tensors are the checkpoint file's pages (mapped copy-on-write): each is held once, no dense
    weight is formed. ``materialize="auto"`` forms ``W_i = B_i A_i`` for the private-only layers whose
    factored product costs at least the dense one (``k (d + h) >= d h``); their paths are in
    ``model.lors_materialized`` (``"never"``: none). The model remembers its checkpoint
    (``model.lors_origin``): :func:`save` and a transformers model's ``save_pretrained`` write it
    back as a LORS checkpoint.
    """
    if materialize not in MATERIALIZE:
        raise LorsUsageError(f"materialize must be one of {', '.join(MATERIALIZE)}, got {materialize!r}")
    ckpt = Checkpoint(path)
    skeleton = model if model is not None else build_architecture(ckpt, trust_pickle, arch, trust_arch)
    skeleton = _meta(skeleton)
    _install(skeleton, ckpt)
    ties = _tied_groups(skeleton)
    try:
        skeleton.load_state_dict(_state(skeleton, ckpt), strict=True, assign=True)
    except RuntimeError as e:
        raise LorsError(f"{ckpt.path}: the architecture does not match the checkpoint ({short(e)})") from None
    _retie(skeleton, ties)
    for key in ckpt.keys():
        if key.startswith(BUFFER_PREFIX):
            name = key[len(BUFFER_PREFIX) :]
            owner, _, attr = name.rpartition(".")
            skeleton.get_submodule(owner).register_buffer(attr, ckpt.get(key), persistent=False)
    leftover = [
        n
        for n, t in list(skeleton.named_parameters()) + list(skeleton.named_buffers())
        if t.device.type == "meta"
    ]
    if leftover:
        raise LorsError(
            f"{ckpt.path}: no value for {leftover[0]!r} (architecture and checkpoint do not match)"
        )
    skeleton = skeleton.to(device).eval()
    skeleton.lors_materialized = _materialize(skeleton) if materialize == "auto" else []
    remember_origin(skeleton, ckpt)
    return skeleton


def _install(skeleton: nn.Module, ckpt: Checkpoint) -> None:
    """LORS layers with empty (meta) tensors in place of the recorded owners."""
    for stack in ckpt.stacks:
        st = Stack(path=stack.get("path", ""), members=list(stack["members"]), member_class=nn.Module)
        for entry in stack["params"]:
            pp = plan_from_entry(st, entry)
            try:
                install_layers(
                    skeleton,
                    pp,
                    torch.empty(*entry["matrix"], device="meta", dtype=getattr(torch, entry["dtype"]))
                    if pp.has_shared
                    else None,
                )
            except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as e:
                raise LorsError(
                    f"{ckpt.path}: the architecture does not match the checkpoint at "
                    f"{stack['members'][0]}.{entry['owner']} ({short(e)})"
                ) from None


def _state(skeleton: nn.Module, ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """Every state-dict key of the skeleton -> its checkpoint tensor (a shared part and a tied
    tensor are read under the name they are stored under; the re-tie drops the extra reads)."""
    state = {}
    owners = ckpt.owner_prefixes()
    manifest_aliases = ckpt.manifest["aliases"]
    for key in skeleton.state_dict(keep_vars=True):
        if key in ckpt:
            state[key] = ckpt.get(key)
            continue
        prefix = next((p for p in owners if key.startswith(p)), None)
        if prefix is not None:
            stack, entry, _ = owners[prefix]
            rel = key[len(prefix) :]
            if rel in entry["shared"]:
                state[key] = ckpt.get(f"{lors_members(stack, entry)[0]}.{entry['owner']}.{rel}")
                continue
        if key in manifest_aliases:
            state[key] = ckpt.get(manifest_aliases[key])
            continue
        raise LorsError(
            f"{ckpt.path}: the architecture expects {key!r}, which the checkpoint lacks "
            "(architecture and checkpoint do not match)"
        )
    return state


def _materialize(model: nn.Module) -> list[str]:
    """Form ``W_i`` in the layers whose factored product costs at least the dense one; their paths.
    The others keep their factors, ``B`` laid out for decoding (:meth:`LorsLayer.relayout`)."""
    formed = []
    for name, m in model.named_modules():
        if isinstance(m, (LorsLinear, LorsConv1D)) and m.prepare_inference():
            formed.append(name)
    if formed:
        log.info(
            "lors: %d private-only layers run as dense W_i = B_i A_i: %s", len(formed), ", ".join(formed)
        )
    return formed


def remember_origin(model: nn.Module, ckpt: Checkpoint) -> None:
    """Record the checkpoint on the model for :func:`save`, and make a transformers model's
    ``save_pretrained`` write a LORS checkpoint."""
    src = ckpt.source
    try:
        report = ckpt.report()
    except LorsError:  # a missing or broken report.json does not stop a load; a save then writes none
        report = None
    model.lors_origin = Origin(
        source=SourceInfo(
            kind=src["kind"],
            path=src.get("path"),
            arch=src.get("arch"),
            sha256=src.get("sha256"),
            files=ckpt.side_files(),
        ),
        manifest=ckpt.manifest,
        files_dir=ckpt.path,
        report=report,
    )
    enable_save_pretrained(model)


def _meta(model: nn.Module) -> nn.Module:
    if all(t.device.type == "meta" for t in list(model.parameters()) + list(model.buffers())):
        return model
    return meta_clone(model)


def _tied_groups(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """Parameters reachable from several (module, name) places, to re-tie after loading."""
    places: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            places.setdefault(id(p), []).append((module, name))
    return [group for group in places.values() if len(group) > 1]


def _retie(model: nn.Module, groups: list[list[tuple[nn.Module, str]]]) -> None:
    for group in groups:
        first_module, first_name = group[0]
        shared = getattr(first_module, first_name)
        for module, name in group[1:]:
            setattr(module, name, shared)
