"""The LORS checkpoint directory: writing it atomically, reading and validating it, merging it.

Layout (``lors_config.json`` documents every name)::

    OUT/
      model.safetensors            # or model-0000i-of-0000n.safetensors + model.safetensors.index.json
      lors_config.json             # format, source, source state-dict manifest, stacks and parameters
      report.json                  # the savings report
      config.json, tokenizer...    # copied from a Hugging Face source

Tensor names: every untouched tensor keeps its original name; for a converted parameter
``<member>.<owner>.weight`` the stack's shared matrix is stored once as
``<first member>.<owner>.shared`` (absent for a private-only stack, whose entry lists ``shared: []``)
and each member's factors as ``<member>.<owner>.lors_A`` / ``lors_B`` (other tensors of the owner,
such as ``bias``, keep their names). Non-persistent
buffers needed to run the model are stored as ``__buffers__.<name>``.
"""
from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .convert import Stack, dtype_name, install_layers, plan_from_entry
from .errors import LorsError, LorsUsageError
from .layers import LorsModule, layer_class
from .report import Report
from .sources import SourceInfo, _short, build_arch, build_hf, load_source
from .streaming import SAFETENSORS_DTYPES

FORMAT = "lors"
FORMAT_VERSION = 1
CONFIG_NAME = "lors_config.json"
REPORT_NAME = "report.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
BUFFER_PREFIX = "__buffers__."
DEFAULT_SHARD_SIZE = "2GB"


# ---------------------------------------------------------------------------------------------
# atomic output


def check_output(out: Path, force: bool) -> None:
    """Refuse early (before any work) when ``out`` exists and ``force`` is not given."""
    if out.exists() and not force:
        raise LorsUsageError(f"{out} already exists: pass --force to replace it")
    parent = Path(os.path.abspath(out)).parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # the nearest existing ancestor is where the temp entry gets created
    if not parent.is_dir():
        raise LorsError(f"cannot write {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LorsError(f"cannot write {out}: {parent} is not writable")


def check_not_input(out: Path, src: Path) -> None:
    """Refuse an output that would replace the input (even with --force): it may be the only copy."""
    o, i = Path(os.path.abspath(out)), Path(os.path.abspath(src))
    if o == i or o in i.parents or i in o.parents:  # the input, a directory holding it, or a file in it
        raise LorsUsageError(f"output {out} would replace the input {src} or a file in it: "
                             "choose another output path")


@contextlib.contextmanager
def atomic_output(out: Path, force: bool = False, directory: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``out``; rename it onto ``out`` only if the block succeeds.

    A crash or kill leaves ``out`` as it was (old content or absent) plus at most a hidden
    ``.<name>.tmp-<pid>@<host>.*`` entry, never a half-written ``out``; the next write of ``out``
    removes such entries whose process is gone (see :func:`sweep_stale_temps`).
    """
    out = Path(out)
    check_output(out, force)
    parent = out.parent if str(out.parent) else Path(".")
    prefix = f"{_temp_prefix(out.name)}{os.getpid()}@{socket.gethostname()}."
    try:
        parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_temps(parent, out.name)
        if directory:
            tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, dir=parent)
            os.close(fd)
            tmp = Path(name)
    except OSError as e:
        raise LorsError(f"cannot write {out}: {e.strerror or e}") from None
    try:
        yield tmp
        _normal_permissions(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as e:
        _remove(tmp)
        raise LorsError(f"cannot write {out}: {e.strerror or e}") from None
    except BaseException:
        _remove(tmp)
        raise


def _temp_prefix(name: str) -> str:
    return f".{name}.tmp-"


def sweep_stale_temps(parent: Path, name: str) -> list[Path]:
    """Remove ``.<name>.tmp-<pid>@<host>.*`` entries left in ``parent`` by killed runs; return them.

    Only entries of this host whose process no longer exists: a live run's, another machine's (a
    shared filesystem) or an unparsable name is left alone. ``.old-*`` entries (the previous output
    during the two-rename swap) are never touched.
    """
    host = socket.gethostname()
    removed = []
    for entry in parent.glob(f"{glob.escape(_temp_prefix(name))}*"):
        owner = entry.name[len(_temp_prefix(name)):]
        pid, at, rest = owner.partition("@")
        entry_host, dot, _ = rest.rpartition(".")
        if not (at and dot and pid.isdigit() and entry_host == host) or _process_alive(int(pid)):
            continue
        _remove(entry)
        removed.append(entry)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, owned by someone else
        return True
    return True


def _normal_permissions(path: Path) -> None:
    """mkdtemp/mkstemp create private (0700/0600) entries: give the result the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    entries = [path] + (list(path.rglob("*")) if path.is_dir() else [])
    for entry in entries:
        os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~umask)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


# ---------------------------------------------------------------------------------------------
# writing


def source_manifest(model: nn.Module) -> dict:
    """The source's state-dict keys with shape and dtype, and which keys alias an earlier one."""
    state = model.state_dict(keep_vars=True)
    keys = {name: {"shape": list(t.shape), "dtype": dtype_name(t.dtype)} for name, t in state.items()}
    return {"keys": keys, "aliases": alias_map(state)}


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


def nonpersistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    persistent = set(model.state_dict().keys())
    return {name: b for name, b in model.named_buffers() if name not in persistent}


def build_config(stacks: list[dict], source: SourceInfo, manifest: dict) -> dict:
    from . import __version__

    return {"format": FORMAT, "format_version": FORMAT_VERSION, "lors_version": __version__,
            "source": source.to_dict(), "manifest": manifest, "stacks": stacks}


def stacks_of(model: nn.Module) -> list[dict]:
    """The ``stacks`` section of the config, read off the LORS layers of a converted model."""
    stacks: dict[tuple, dict] = {}
    seen: set[int] = set()
    for _, layer in model.named_modules():
        if not isinstance(layer, LorsModule) or not hasattr(layer, "lors_entry"):
            continue
        key = (layer.lors_stack["path"], tuple(layer.lors_stack["members"]))
        stack = stacks.setdefault(key, {**layer.lors_stack, "params": []})
        if id(layer.lors_entry) not in seen:
            seen.add(id(layer.lors_entry))
            stack["params"].append(layer.lors_entry)
    return list(stacks.values())


def dedup_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the first name of every tensor stored under several names (shared, tied)."""
    aliases = alias_map(state)
    return {name: t for name, t in state.items() if name not in aliases}


def write_tensors(directory: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                  max_shard_size: int | str = DEFAULT_SHARD_SIZE) -> None:
    """``model.safetensors`` or shards + index, through the same writer as streaming conversion.

    (huggingface_hub's save_torch_state_dict would drop all but one empty tensor as "shared": the
    rank-0 factors a budget can produce.)
    """
    from .streaming import ShardedWriter, meta_like

    writer = ShardedWriter(directory, {k: meta_like(v.shape, v.dtype) for k, v in tensors.items()},
                           max_shard_size, metadata)
    for key, t in tensors.items():
        writer.add(key, t)
    writer.close()


def write_checkpoint(out: Path, tensors: dict[str, torch.Tensor], config: dict, report: Report,
                     source: SourceInfo | None = None, force: bool = False,
                     max_shard_size: int | str = DEFAULT_SHARD_SIZE, files_dir: Path | None = None) -> Path:
    """Write a checkpoint directory atomically; HF side files come from ``files_dir`` or the source."""
    out = Path(out)
    config_text = json.dumps(config, indent=1)
    with atomic_output(out, force) as tmp:
        write_tensors(tmp, tensors, {"format": "pt", "lors_config": json.dumps(config)}, max_shard_size)
        (tmp / CONFIG_NAME).write_text(config_text)
        (tmp / REPORT_NAME).write_text(json.dumps(report.to_dict(), indent=1))
        if source is not None and source.kind == "hf" and source.path:
            for name in source.files:
                shutil.copy2(Path(files_dir or source.path) / name, tmp / name)
    return out


def save(model: nn.Module, out: str | Path, report: Report | None = None, source: SourceInfo | None = None,
         manifest: dict | None = None, force: bool = False, max_shard_size: int | str = DEFAULT_SHARD_SIZE,
         files_dir: Path | None = None) -> Path:
    """Write a converted model as a LORS checkpoint directory.

    ``manifest`` is the source's state-dict manifest (:func:`source_manifest` of the dense model,
    taken before conversion); without it it is reconstructed from the LORS layers.
    """
    stacks = stacks_of(model)
    if not stacks:
        raise LorsError("the model has no LORS layers: convert it first")
    manifest = manifest or _manifest_from_lors(model, stacks)
    source = source or SourceInfo(kind="module")
    state = dedup_state(model.state_dict(keep_vars=True))
    state.update({BUFFER_PREFIX + k: v for k, v in nonpersistent_buffers(model).items()})
    config = build_config(stacks, source, manifest)
    return write_checkpoint(Path(out), state, config, report or Report(), source, force, max_shard_size, files_dir)


def _manifest_from_lors(model: nn.Module, stacks: list[dict]) -> dict:
    """Dense keys of a converted model: LORS owners give back ``<owner>.<attr>`` in place of factors."""
    dense_model_keys: dict[str, dict] = {}
    lors_state = model.state_dict(keep_vars=True)
    owners = {}
    for stack in stacks:
        for entry in stack["params"]:
            for member in stack["members"]:
                owners[f"{member}.{entry['owner']}."] = entry
    for name, t in lors_state.items():
        prefix = next((p for p in owners if name.startswith(p)), None)
        if prefix is None:
            dense_model_keys[name] = {"shape": list(t.shape), "dtype": dtype_name(t.dtype)}
            continue
        entry = owners[prefix]
        weight_key = prefix + entry["attr"]
        dense_model_keys.setdefault(weight_key, {"shape": entry["shape"], "dtype": entry["dtype"]})
        rel = name[len(prefix):]
        if not rel.startswith("lors_") and rel not in entry["shared"]:  # factors are not dense keys
            dense_model_keys[name] = {"shape": list(t.shape), "dtype": dtype_name(t.dtype)}
    aliases = alias_map({name: t for name, t in lors_state.items() if name in dense_model_keys})
    return {"keys": dense_model_keys, "aliases": aliases}


# ---------------------------------------------------------------------------------------------
# reading


class Checkpoint:
    """A validated LORS checkpoint directory with lazy tensor access (``safetensors.safe_open``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise LorsError(f"{self.path}: no such file or directory")
        if not (self.path / CONFIG_NAME).is_file():
            raise LorsError(f"{self.path}: not a LORS checkpoint (no {CONFIG_NAME})")
        self.config = _read_json(self.path / CONFIG_NAME)
        _validate_config(self.config, self.path / CONFIG_NAME)
        self._files = self._weight_files()
        self._where: dict[str, Path] = {}
        self._shapes: dict[str, tuple] = {}
        self._dtypes: dict[str, str | None] = {}
        for f in self._files:
            with self._open(f) as handle:
                meta = handle.metadata() or {}
                stored = meta.get("lors_config")
                if stored is not None and _json_or_none(stored) != self.config:
                    raise LorsError(f"{self.path / CONFIG_NAME} differs from the config in {f.name}'s metadata: "
                                    "the checkpoint was edited or mixed with another")
                for key in handle.keys():
                    self._where[key] = f
                    sl = handle.get_slice(key)
                    self._shapes[key] = tuple(sl.get_shape())
                    self._dtypes[key] = SAFETENSORS_DTYPES.get(sl.get_dtype())
        self._check_tensors()

    # -- structure
    @property
    def stacks(self) -> list[dict]:
        return self.config["stacks"]

    @property
    def manifest(self) -> dict:
        return self.config["manifest"]

    @property
    def source(self) -> dict:
        return self.config["source"]

    def keys(self) -> list[str]:
        return list(self._where)

    def report(self) -> Report:
        path = self.path / REPORT_NAME
        if not path.is_file():
            raise LorsError(f"{self.path}: missing {REPORT_NAME}")
        try:
            report = Report.from_dict(_read_json(path))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise LorsError(f"{path}: malformed report ({_short(e)})") from None
        _check_report_types(report, path)
        recorded = {(tuple(s.members), m.name): list(m.ranks) for s in report.stacks for m in s.matrices}
        for stack in self.stacks:
            for entry in stack["params"]:
                ranks = recorded.get((tuple(stack["members"]), entry["name"]))
                if ranks != list(entry["ranks"]):
                    raise LorsError(f"{path} does not match {CONFIG_NAME}: {stack['members'][0]}.. {entry['name']} "
                                    f"has ranks {ranks} in the report, {entry['ranks']} in the config")
        return report

    def get(self, key: str) -> torch.Tensor:
        if key not in self._where:
            raise LorsError(f"{self.path}: tensor {key!r} is missing from the checkpoint")
        with self._open(self._where[key]) as handle:  # a map per read: see SafetensorsSource.get
            try:
                return handle.get_tensor(key)
            except Exception as e:
                raise LorsError(f"{self._where[key]}: cannot read tensor {key!r} ({_short(e)})") from None

    # -- internals
    def _weight_files(self) -> list[Path]:
        index = self.path / INDEX_NAME
        if index.is_file():
            data = _read_json(index)
            try:
                names = sorted(set(data["weight_map"].values()))
            except (KeyError, TypeError, AttributeError):
                raise LorsError(f"{index}: malformed index (weight_map must map tensor names to "
                                "shard file names)") from None
            for n in names:
                if not isinstance(n, str) or not n or Path(n).name != n or n in (".", ".."):
                    raise LorsError(f"{index}: shard {n!r} names a file outside the checkpoint directory")
            files = [self.path / n for n in names]
        else:
            files = [self.path / WEIGHTS_NAME]
        for f in files:
            if not f.is_file():
                raise LorsError(f"{self.path}: missing weight file {f.name}")
        return files

    def _open(self, f: Path):
        """A fresh handle (use as a context manager): its memory map dies with the tensors read."""
        from safetensors import safe_open

        try:
            return safe_open(str(f), framework="pt", device="cpu")
        except Exception as e:
            raise LorsError(f"{f}: not a readable safetensors file ({_short(e)})") from None

    def _shape(self, key: str) -> tuple:
        if key not in self._shapes:
            raise LorsError(f"{self.path}: tensor {key!r} named in {CONFIG_NAME} is missing")
        return self._shapes[key]

    def _check_tensors(self) -> None:
        """Every tensor the config promises is there with the right shape."""
        for stack in self.stacks:
            members = stack["members"]
            for entry in stack["params"]:
                owner0 = f"{members[0]}.{entry['owner']}"
                if entry["kind"] == "static":
                    d, h = entry["matrix"]
                    if entry["shared"]:  # [] for a private-only stack
                        self._expect(f"{owner0}.shared", (d, h), entry["dtype"])
                    for member, k in zip(members, entry["ranks"]):
                        owner = f"{member}.{entry['owner']}"
                        self._expect(f"{owner}.lors_B", (d, k), entry["dtype"])
                        self._expect(f"{owner}.lors_A", (k, h), entry["dtype"])
                else:
                    for name in entry["shared"]:
                        self._shape(f"{owner0}.{name}")
        owners = self.owner_prefixes()
        for key in self._shapes:  # a stray tensor under a static owner (a dropped "shared") is refused
            prefix, _, rel = key.rpartition(".")
            stack_entry = owners.get(prefix + ".")
            if stack_entry is None or stack_entry[1]["kind"] != "static" or key in self.manifest["keys"]:
                continue
            _, entry, i = stack_entry
            if rel not in ("lors_A", "lors_B") and not (i == 0 and rel in entry["shared"]):
                raise LorsError(f"{self.path}: tensor {key!r} is not named in {CONFIG_NAME}")
        produced = set(owners)
        for key in self.manifest["keys"]:
            if key in self.manifest["aliases"] or any(key.startswith(p) for p in produced):
                continue
            spec = self.manifest["keys"][key]
            self._expect(key, tuple(spec["shape"]), spec["dtype"])

    def _expect(self, key: str, shape: tuple, dtype: str | None = None) -> None:
        got = self._shape(key)
        if tuple(got) != tuple(shape):
            raise LorsError(f"{self.path}: tensor {key!r} has shape {list(got)}, {CONFIG_NAME} says {list(shape)}")
        stored = self._dtypes.get(key)
        if dtype is not None and stored is not None and stored != dtype:
            raise LorsError(f"{self.path}: tensor {key!r} is stored as {stored}, {CONFIG_NAME} says {dtype}")

    def owner_prefixes(self) -> dict[str, tuple[dict, dict, int]]:
        """``"<member>.<owner>."`` -> (stack, entry, member index) for every converted owner."""
        out = {}
        for stack in self.stacks:
            for entry in stack["params"]:
                for i, member in enumerate(stack["members"]):
                    out[f"{member}.{entry['owner']}."] = (stack, entry, i)
        return out

    def owner_state(self, stack: dict, entry: dict, i: int) -> dict[str, torch.Tensor]:
        """The LORS layer's tensors of member ``i`` under their relative names."""
        prefix = f"{stack['members'][i]}.{entry['owner']}."
        first = f"{stack['members'][0]}.{entry['owner']}."
        state = {name: self.get(first + name) for name in entry["shared"]}
        for key in self._where:
            if key.startswith(prefix):
                state.setdefault(key[len(prefix):], self.get(key))
        return state


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise LorsError(f"{path}: cannot read ({_short(e)})") from None
    except ValueError as e:
        raise LorsError(f"{path}: not valid JSON ({_short(e)})") from None


def _json_or_none(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def _validate_config(config, path: Path) -> None:
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
    if not isinstance(manifest, dict) or not isinstance(manifest.get("keys"), dict) \
            or not isinstance(manifest.get("aliases"), dict):
        fail("malformed manifest")
    if not isinstance(config["stacks"], list):
        fail("stacks must be a list")
    for s in config["stacks"]:
        if not isinstance(s, dict) or not isinstance(s.get("members"), list) or len(s["members"]) < 2 \
                or not isinstance(s.get("params"), list):
            fail("malformed stack entry")
        for e in s["params"]:
            needed = ("name", "owner", "attr", "layer", "kind", "shape", "dtype", "matrix", "groups", "ranks",
                      "shared")
            if not isinstance(e, dict) or any(k not in e for k in needed):
                fail(f"malformed parameter entry in stack {s.get('path')!r}")
            try:
                layer_class(e["layer"])
            except (KeyError, TypeError):
                fail(f"unknown layer kind {e['layer']!r}")
            if not isinstance(e["ranks"], list) or len(e["ranks"]) != len(s["members"]):
                fail(f"{e['name']}: ranks must have one entry per member")
            if not hasattr(torch, str(e["dtype"])) or not isinstance(getattr(torch, str(e["dtype"])), torch.dtype):
                fail(f"{e['name']}: unknown dtype {e['dtype']!r}")
            _validate_entry(e, s["members"], fail)
    _validate_structure(config, fail)


def _check_report_types(report: Report, path: Path) -> None:
    """The fields rendering and ``--json`` compute with have the types they need."""
    def num_list(x) -> bool:
        return isinstance(x, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in x)

    ok = _is_int(report.params_before) and _is_int(report.params_after) and _is_strs(report.warnings)
    for s in report.stacks:
        ok = ok and isinstance(s.path, str) and _is_strs(s.members) and len(s.members) > 0 \
            and isinstance(s.kept_dense, dict) and _is_strs(list(s.kept_dense.values()))
        for m in s.matrices:
            ok = ok and all(isinstance(v, str) for v in (m.name, m.kind, m.layer)) and _is_dims(m.shape) \
                and _is_dims(m.matrix) and (m.rank is None or _is_int(m.rank)) and _is_dims(m.groups, low=1) \
                and len(m.groups) > 0 and _is_dims(m.ranks) and _is_int(m.dense_params) \
                and _is_int(m.lors_params) and num_list(m.relative_error) and num_list(m.retained_energy) \
                and isinstance(m.clamped, bool)
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
        fail(f"{name}: a static parameter's shared must be ['shared'] or [] (private-only), got {e['shared']!r}")
    if not isinstance(e.get("extra", {}), dict):
        fail(f"{name}: extra must be an object")


def _validate_structure(config: dict, fail) -> None:
    """Source, manifest and members: the types every reader relies on."""
    source = config["source"]
    if not isinstance(source, dict) or not isinstance(source.get("kind"), str) \
            or any(not isinstance(source.get(k), (str, type(None))) for k in ("path", "arch", "sha256")):
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
    for s in config["stacks"]:
        if not _is_strs(s["members"]) or len(set(s["members"])) != len(s["members"]):
            fail(f"stack {s.get('path')!r}: members must be distinct strings")
        if not isinstance(s.get("path", ""), str):
            fail("stack path must be a string")


# ---------------------------------------------------------------------------------------------
# merge: pure tensor math from the checkpoint alone


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
            prefix = f"{member}.{entry['owner']}."
            try:
                dense = cls.merge_state(ckpt.owner_state(stack, entry, i), entry)
            except (KeyError, RuntimeError, ValueError) as e:
                raise LorsError(f"{ckpt.path}: cannot merge {prefix}{entry['attr']} ({_short(e)})") from None
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
    from .streaming import ShardedWriter

    with atomic_output(out, force) as tmp:  # streamed: shards are written as their groups are merged
        writer = ShardedWriter(tmp, merge_spec(ckpt), max_shard_size, metadata)
        for key, t in merged_tensors(ckpt, progress):
            writer.add(key, t)
        writer.close()
        if ckpt.source.get("kind") == "hf":
            for f in ckpt.path.iterdir():
                if f.is_file() and f.name not in (CONFIG_NAME, REPORT_NAME, WEIGHTS_NAME, INDEX_NAME) \
                        and not f.name.endswith(".safetensors"):
                    shutil.copy2(f, tmp / f.name)
    return out


def merge_spec(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """Meta tensors of the dense output in the order :func:`merged_tensors` produces them."""
    from .streaming import meta_like

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


# ---------------------------------------------------------------------------------------------
# load: a runnable LORS model


TRUSTED_ARCH_PREFIX = "lors_convert.zoo."  # our own reference models: safe to build from a recorded name


def build_architecture(ckpt: Checkpoint, trust_pickle: bool = False, arch: str | None = None,
                       trust_arch: bool = False) -> nn.Module:
    """The dense architecture the checkpoint came from, on the meta device.

    A state-dict source records its ``--arch`` reference; importing and calling it runs code named in
    the file, so it is used only when the caller passes it again (``arch=``), opts in with
    ``trust_arch=True``, or it names one of lors's own zoo models.
    """
    source = ckpt.source
    kind = source.get("kind")
    if kind == "hf":
        return build_hf(ckpt.path, device="meta", keys=set(ckpt.config["manifest"]["keys"]))
    if kind == "state_dict":
        recorded = source["arch"]
        if arch is None:
            if not (trust_arch or str(recorded).startswith(TRUSTED_ARCH_PREFIX)):
                raise LorsError(f"{ckpt.path}: the checkpoint names the architecture {recorded!r}; calling it "
                                f"runs code named in the file: pass arch={recorded!r} (or trust_arch=True) "
                                "if you trust it, or the dense model as model=")
            arch = recorded
        return build_arch(arch, device="meta")
    if kind == "pickle":
        if not source.get("path") or not Path(source["path"]).is_file():
            raise LorsError(f"{ckpt.path}: converted from a pickled module ({source.get('path')}), which is "
                            "needed to rebuild the architecture and is not there")
        model, _ = load_source(source["path"], trust_pickle=trust_pickle)
        return model
    if kind == "torchscript":
        raise LorsError(f"{ckpt.path}: a TorchScript source cannot be rebuilt as a runnable LORS model; "
                        "use `lors merge` to get dense weights")
    raise LorsError(f"{ckpt.path}: source kind {kind!r} records no architecture; "
                    "pass the dense model: load(path, model=...)")


def load(path: str | Path, model: nn.Module | None = None, arch: str | None = None, trust_arch: bool = False,
         trust_pickle: bool = False, device: str | torch.device = "cpu") -> nn.Module:
    """A runnable, trainable LORS model from a checkpoint.

    The architecture comes from the recorded source (see :func:`build_architecture` for when a
    recorded ``--arch`` is used), or ``arch`` ("pkg.module:callable"), or ``model`` (a dense instance
    of it, whose weights are not used); it is built on the meta device and filled from the checkpoint.
    """
    ckpt = Checkpoint(path)
    skeleton = model if model is not None else build_architecture(ckpt, trust_pickle, arch, trust_arch)
    skeleton = _meta(skeleton)
    for stack in ckpt.stacks:
        st = Stack(path=stack.get("path", ""), members=list(stack["members"]), member_class=nn.Module)
        for entry in stack["params"]:
            pp = plan_from_entry(st, entry)
            try:
                install_layers(skeleton, pp, torch.empty(*entry["matrix"], device="meta",
                                                         dtype=getattr(torch, entry["dtype"]))
                               if pp.has_shared else None)
            except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as e:
                raise LorsError(f"{ckpt.path}: the architecture does not match the checkpoint at "
                                f"{stack['members'][0]}.{entry['owner']} ({_short(e)})") from None
    ties = _tied_groups(skeleton)
    state = {}
    owners = ckpt.owner_prefixes()
    manifest_aliases = ckpt.manifest["aliases"]
    for key, t in skeleton.state_dict(keep_vars=True).items():
        if key in ckpt._where:
            state[key] = ckpt.get(key)
            continue
        prefix = next((p for p in owners if key.startswith(p)), None)
        if prefix is not None:
            stack, entry, _ = owners[prefix]
            rel = key[len(prefix):]
            if rel in entry["shared"]:
                state[key] = ckpt.get(f"{stack['members'][0]}.{entry['owner']}.{rel}")
                continue
        if key in manifest_aliases:
            state[key] = ckpt.get(manifest_aliases[key])
            continue
        raise LorsError(f"{ckpt.path}: the architecture expects {key!r}, which the checkpoint lacks "
                        "(architecture and checkpoint do not match)")
    try:
        skeleton.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise LorsError(f"{ckpt.path}: the architecture does not match the checkpoint ({_short(e)})") from None
    _retie(skeleton, ties)
    for key in ckpt.keys():
        if key.startswith(BUFFER_PREFIX):
            name = key[len(BUFFER_PREFIX):]
            owner, _, attr = name.rpartition(".")
            skeleton.get_submodule(owner).register_buffer(attr, ckpt.get(key), persistent=False)
    leftover = [n for n, t in list(skeleton.named_parameters()) + list(skeleton.named_buffers())
                if t.device.type == "meta"]
    if leftover:
        raise LorsError(f"{ckpt.path}: no value for {leftover[0]!r} (architecture and checkpoint do not match)")
    return skeleton.to(device).eval()


def _meta(model: nn.Module) -> nn.Module:
    if all(t.device.type == "meta" for t in list(model.parameters()) + list(model.buffers())):
        return model
    from .layers import meta_clone

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
