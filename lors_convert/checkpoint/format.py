"""The LORS checkpoint format: names, the config (source, manifest, stacks) and its validation.

The directory layout and tensor names are described in :mod:`lors_convert.checkpoint`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Iterable
from pathlib import Path

import torch
from torch import nn

from ..discover.plan import AdaptivePlan, ConversionPlan, ParamPlan
from ..discover.stacks import Stack, StackedParam
from ..errors import LorsError
from ..io.sources import SourceInfo
from ..layers import LorsModule, layer_class
from ..report import Report
from ..version import __version__

FORMAT = "lors"
FORMAT_VERSION = 1
CONFIG_NAME = "lors_config.json"
REPORT_NAME = "report.json"
BUFFER_PREFIX = "__buffers__."
DEFAULT_SHARD_SIZE = "2GB"


def source_manifest(model: nn.Module, stored: Collection[str] | None = None) -> dict:
    """The source's state-dict keys with shape and dtype, which keys alias an earlier one (tied), and
    which of those aliases the source stores under their own name too (``stored``: the source file's
    tensor names; None: the state dict is the source, which has every name)."""
    state = model.state_dict(keep_vars=True)
    keys = {name: {"shape": list(t.shape), "dtype": dtype_name(t.dtype)} for name, t in state.items()}
    aliases = alias_map(state)
    kept = [k for k in aliases if stored is None or k in stored]
    return {"keys": keys, "aliases": aliases, "stored_aliases": kept}


def merged_keys(manifest: dict) -> list[str]:
    """The keys a merge writes, exactly the source's: a tied tensor under the names the source stored
    it under (an HF directory or a GGUF file stores ``lm_head.weight`` tied to the embeddings once,
    and ``from_pretrained`` re-ties it). A manifest written before ``stored_aliases`` writes every name."""
    kept = manifest.get("stored_aliases")
    if kept is None:
        return list(manifest["keys"])
    aliases, kept = manifest["aliases"], set(kept)
    return [k for k in manifest["keys"] if k not in aliases or k in kept]


def stored_manifest(manifest: dict, stored) -> dict | None:
    """``manifest`` of a meta-device architecture with the dtypes as stored; None when a key is not
    in the stored tensors (they do not map onto the architecture: load the model whole instead).
    ``stored`` is a lazy reader (``SafetensorsReader`` or ``GGUFTensors``)."""
    keys, aliases = manifest["keys"], manifest["aliases"]
    manifest["stored_aliases"] = [k for k in aliases if k in stored]
    for key, spec in keys.items():
        if key in aliases:
            continue
        if key not in stored:
            return None
        if list(stored.shapes[key]) != spec["shape"]:
            raise LorsError(
                f"source tensor {key!r} has shape {list(stored.shapes[key])}, "
                f"the architecture expects {spec['shape']}"
            )
        spec["dtype"] = dtype_name(stored.dtype(key))
    for key, target in aliases.items():
        keys[key]["dtype"] = keys[target]["dtype"]
    return manifest


def alias_map(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """Names whose tensor is the same memory as an earlier name's (tied, shared) -> that first name."""
    aliases: dict[str, str] = {}
    first_of: dict[tuple, str] = {}
    for name, t in state.items():
        ident = _identity(t)
        if ident in first_of:
            aliases[name] = first_of[ident]
        else:
            first_of[ident] = name
    return aliases


def _identity(t: torch.Tensor) -> tuple:
    if t.device.type == "meta" or t.numel() == 0:  # empty tensors all sit at address 0: never aliases
        return ("id", id(t))
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def lors_members(stack: dict, entry: dict) -> list[str]:
    """The members of a recorded stack whose parameter ``entry`` is a LORS layer (not kept dense);
    the first holds the stack's shared tensors."""
    dense = set(entry.get("dense_members", []))
    return [m for i, m in enumerate(stack["members"]) if i not in dense]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def param_entry(pp: ParamPlan) -> dict:
    """The JSON record of one converted parameter (``lors_config.json`` -> stacks[].params[])."""
    entry = {
        "name": pp.relname,
        "owner": pp.param.owner_relpath,
        "attr": pp.param.attr,
        "layer": pp.layer_kind,
        "kind": pp.kind,
        "shape": list(pp.param.shape),
        "dtype": dtype_name(pp.param.dtype),
        "matrix": list(pp.matrix),
        "rank": pp.rank,
        "groups": list(pp.groups),
        "ranks": list(pp.ranks),
        "clamped": pp.clamped,
        "shared": list(layer_class(pp.layer_kind).shared_names) if pp.has_shared else [],
        "extra": dict(pp.extra),
    }
    if pp.dense_members:  # members kept dense: their weight stays under its own key (rank 0 here)
        entry["dense_members"] = list(pp.dense_members)
    return entry


def plan_from_entry(stack: Stack, entry: dict) -> ParamPlan:
    """Rebuild the :class:`ParamPlan` of a recorded parameter (to build a skeleton)."""
    sp = StackedParam(
        relname=entry["name"],
        shape=tuple(entry["shape"]),
        dtype=getattr(torch, entry["dtype"]),
        owner_class=nn.Module,
    )
    cls = AdaptivePlan if entry["kind"] == "adaptive" else ParamPlan  # adaptive: (out, dq+1) matrix
    return cls(
        stack=stack,
        param=sp,
        layer_kind=entry["layer"],
        kind=entry["kind"],
        rank=entry["rank"],
        groups=list(entry["groups"]),
        ranks=list(entry["ranks"]),
        clamped=bool(entry.get("clamped", False)),
        extra=dict(entry.get("extra", {})),
        has_shared=entry["kind"] != "static" or bool(entry["shared"]),
        dense_members=list(entry.get("dense_members", [])),
    )


def nonpersistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    persistent = set(model.state_dict().keys())
    return {name: b for name, b in model.named_buffers() if name not in persistent}


def build_config(stacks: list[dict], source: SourceInfo, manifest: dict) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lors_version": __version__,
        "source": source.to_dict(),
        "manifest": manifest,
        "stacks": stacks,
    }


def stacks_section(pairs: Iterable[tuple[dict, dict]]) -> list[dict]:
    """The config's ``stacks``: ``(stack record {"path", "members"}, parameter entry)`` pairs grouped
    by stack in order of first appearance; an entry object seen twice is recorded once."""
    stacks: dict[tuple, dict] = {}
    seen: set[int] = set()
    for stack, entry in pairs:
        key = (stack["path"], tuple(stack["members"]))
        record = stacks.setdefault(
            key, {"path": stack["path"], "members": list(stack["members"]), "params": []}
        )
        if id(entry) not in seen:
            seen.add(id(entry))
            record["params"].append(entry)
    return list(stacks.values())


def plan_stacks(plan: ConversionPlan) -> list[dict]:
    """The ``stacks`` section of a conversion plan."""
    return stacks_section(
        ({"path": pp.stack.path, "members": pp.stack.members}, param_entry(pp)) for pp in plan.params
    )


def model_stacks(model: nn.Module) -> list[dict]:
    """The ``stacks`` section read off the LORS layers of a converted model (each knows its plan)."""
    plans: dict[int, ParamPlan] = {}
    for layer in model.modules():
        pp = getattr(layer, "lors_plan", None)
        if isinstance(layer, LorsModule) and pp is not None:
            plans.setdefault(id(pp), pp)
    return stacks_section(
        ({"path": pp.stack.path, "members": pp.stack.members}, param_entry(pp)) for pp in plans.values()
    )


def dedup_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the first name of every tensor stored under several names (shared, tied)."""
    aliases = alias_map(state)
    return {name: t for name, t in state.items() if name not in aliases}


# ---------------------------------------------------------------------------------------------
# validation


def json_or_none(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def validate_config(config, path: Path) -> None:
    def fail(why: str):
        raise LorsError(f"{path}: {why}")

    if not isinstance(config, dict) or config.get("format") != FORMAT:
        fail("not a LORS config (format is not 'lors')")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        fail(f"unknown format version {version!r} (this lors reads version {FORMAT_VERSION})")
    for field in ("source", "manifest", "stacks"):
        if field not in config:
            fail(f"missing field {field!r}")
    manifest = config["manifest"]
    if (
        not isinstance(manifest, dict)
        or not isinstance(manifest.get("keys"), dict)
        or not isinstance(manifest.get("aliases"), dict)
    ):
        fail("malformed manifest")
    if not isinstance(config["stacks"], list):
        fail("stacks must be a list")
    for s in config["stacks"]:
        if (
            not isinstance(s, dict)
            or not isinstance(s.get("members"), list)
            or len(s["members"]) < 2
            or not isinstance(s.get("params"), list)
        ):
            fail("malformed stack entry")
        for e in s["params"]:
            needed = (
                "name",
                "owner",
                "attr",
                "layer",
                "kind",
                "shape",
                "dtype",
                "matrix",
                "groups",
                "ranks",
                "shared",
            )
            if not isinstance(e, dict) or any(k not in e for k in needed):
                fail(f"malformed parameter entry in stack {s.get('path')!r}")
            try:
                layer_class(e["layer"])
            except (KeyError, TypeError):
                fail(f"unknown layer kind {e['layer']!r}")
            if not isinstance(e["ranks"], list) or len(e["ranks"]) != len(s["members"]):
                fail(f"{e['name']}: ranks must have one entry per member")
            if not hasattr(torch, str(e["dtype"])) or not isinstance(
                getattr(torch, str(e["dtype"])), torch.dtype
            ):
                fail(f"{e['name']}: unknown dtype {e['dtype']!r}")
            _validate_entry(e, s["members"], fail)
    _validate_structure(config, fail)


def check_report_types(report: Report, path: Path) -> None:
    """The fields rendering and ``--json`` compute with have the types they need."""

    def num_list(x) -> bool:
        return isinstance(x, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in x)

    ok = _is_int(report.params_before) and _is_int(report.params_after) and _is_strs(report.warnings)
    for s in report.stacks:
        ok = (
            ok
            and isinstance(s.path, str)
            and _is_strs(s.members)
            and len(s.members) > 0
            and isinstance(s.kept_dense, dict)
            and _is_strs(list(s.kept_dense.values()))
            and isinstance(s.kept_dense_params, dict)
            and all(_is_int(v) for v in s.kept_dense_params.values())
        )
        for m in s.matrices:
            ok = (
                ok
                and all(isinstance(v, str) for v in (m.name, m.kind, m.layer))
                and _is_dims(m.shape)
                and _is_dims(m.matrix)
                and (m.rank is None or _is_int(m.rank))
                and _is_dims(m.groups, low=1)
                and len(m.groups) > 0
                and _is_dims(m.ranks)
                and _is_int(m.dense_params)
                and _is_int(m.lors_params)
                and num_list(m.relative_error)
                and num_list(m.retained_energy)
                and isinstance(m.clamped, bool)
                and _is_dims(m.dense_members)
            )
    if not ok:
        raise LorsError(f"{path}: malformed report (a field has the wrong type)")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_dims(x, n: int | None = None, low: int = 0) -> bool:
    return isinstance(x, list) and (n is None or len(x) == n) and all(_is_int(v) and v >= low for v in x)


def _is_strs(x) -> bool:
    return isinstance(x, list) and all(isinstance(v, str) for v in x)


def _is_dtype(x) -> bool:
    return isinstance(x, str) and isinstance(getattr(torch, x, None), torch.dtype)


def _validate_entry(e: dict, members: list, fail) -> None:
    """Types and sizes of one parameter entry: what reading and merging index into."""
    name = e["name"]
    if not all(isinstance(e[k], str) for k in ("name", "owner", "attr", "layer")):
        fail(f"parameter entry {name!r}: name, owner, attr and layer must be strings")
    if e["kind"] not in ("static", "adaptive"):
        fail(f"{name}: kind must be 'static' or 'adaptive', got {e['kind']!r}")
    if not _is_dims(e["shape"], low=1) or len(e["shape"]) < 2:
        fail(f"{name}: shape must be a list of >= 2 positive integers, got {e['shape']!r}")
    if not _is_dims(e["matrix"], 2, low=1):
        fail(f"{name}: matrix must be [d, h] (two positive integers), got {e['matrix']!r}")
    if e["kind"] == "static" and e["matrix"][0] * e["matrix"][1] != math.prod(e["shape"]):
        fail(f"{name}: matrix {e['matrix']} does not hold shape {e['shape']}")
    if not _is_dims(e["groups"], len(members), low=1):
        fail(f"{name}: groups must be one positive integer per member")
    # a static rank is bounded by min(d, h); an adaptive one by each generated matrix (checked by shapes)
    bound = min(e["matrix"]) if e["kind"] == "static" else max(e["matrix"])
    if not _is_dims(e["ranks"], len(members)) or any(k > bound for k in e["ranks"]):
        fail(f"{name}: ranks must be one integer in 0..{bound} per member, got {e['ranks']!r}")
    # 0 is legitimate: a budget may keep only the shared matrix of a parameter
    if e["rank"] is not None and not (_is_int(e["rank"]) and e["rank"] >= 0):
        fail(f"{name}: rank must be a non-negative integer or null, got {e['rank']!r}")
    if not _is_strs(e["shared"]):
        fail(f"{name}: shared must be a list of tensor names")
    if e["kind"] == "static" and e["shared"] not in (["shared"], []):
        fail(
            f"{name}: a static parameter's shared must be ['shared'] or [] (private-only), got {e['shared']!r}"
        )
    if not isinstance(e.get("extra", {}), dict):
        fail(f"{name}: extra must be an object")
    dense = e.get("dense_members", [])
    if (
        not _is_dims(dense)
        or len(set(dense)) != len(dense)
        or any(i >= len(members) for i in dense)
        or len(dense) >= len(members)
        or (dense and e["kind"] != "static")
        or any(e["ranks"][i] != 0 for i in dense)
    ):
        fail(
            f"{name}: dense_members must be distinct member indices (not all of them) of rank 0, "
            f"got {dense!r}"
        )


def _validate_structure(config: dict, fail) -> None:
    """Source, manifest and members: the types every reader relies on."""
    source = config["source"]
    if (
        not isinstance(source, dict)
        or not isinstance(source.get("kind"), str)
        or any(not isinstance(source.get(k), (str, type(None))) for k in ("path", "arch", "sha256"))
    ):
        fail("malformed source (kind, path, arch must be strings)")
    if source["kind"] == "state_dict" and not isinstance(source.get("arch"), str):
        fail("a state_dict source must record its arch")
    manifest = config["manifest"]
    for key, spec in manifest["keys"].items():
        if not isinstance(spec, dict) or not _is_dims(spec.get("shape")) or not _is_dtype(spec.get("dtype")):
            fail(f"manifest entry {key!r} must have a shape (list of integers) and a dtype")
    for key, target in manifest["aliases"].items():
        if not isinstance(target, str) or target not in manifest["keys"] or key not in manifest["keys"]:
            fail(f"manifest alias {key!r} -> {target!r} names a key the manifest lacks")
    stored_aliases = manifest.get("stored_aliases", [])  # absent in checkpoints written before it
    if not _is_strs(stored_aliases) or any(k not in manifest["aliases"] for k in stored_aliases):
        fail("manifest stored_aliases must list aliases of the manifest")
    for s in config["stacks"]:
        if not _is_strs(s["members"]) or len(set(s["members"])) != len(s["members"]):
            fail(f"stack {s.get('path')!r}: members must be distinct strings")
        if not isinstance(s.get("path", ""), str):
            fail("stack path must be a string")
