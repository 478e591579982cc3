"""Reading the models users have: HF directories, state dicts + architecture, GGUF files, TorchScript,
pickles.

Knows nothing of LORS. :func:`load_source` loads a dense model whole; :func:`open_lazy` gives,
for an HF directory, a ``.safetensors`` file + architecture or a GGUF file, the architecture on the
meta device and a lazy reader of its tensors (streaming). Unpickling runs code from the file, so every
``torch.load`` here is ``weights_only=True`` unless the caller passes ``trust_pickle=True``. Every
failure is a :class:`LorsError` naming the file.
"""

from __future__ import annotations

import importlib
import pickle
import shutil
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import LorsError, LorsUsageError, short
from ..finite import all_finite
from .atomic import recover_output
from .confine import confined
from .digest import Digest, file_sha256
from .gguf import GGUFFile, is_gguf
from .gguf_model import GGUFTensors, export_side_files, load_config
from .hf import build_hf, hf_side_files, hf_weight_files, is_hf_dir, load_hf
from .memory import empty_model
from .safetensors import SafetensorsReader

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
PICKLE_FLAG = "--trust-pickle"


@dataclass
class SourceInfo:
    """What a checkpoint records about where its weights came from."""

    kind: str  # "hf", "state_dict", "gguf", "torchscript", "pickle", "module"
    path: str | None = None
    arch: str | None = None  # "pkg.module:callable" for state dicts; HF class name for "hf" and "gguf"
    sha256: str | None = None
    files: list[str] = field(default_factory=list)  # small HF side files copied along (config, tokenizer)
    # the tensor names the source file stores (None: the model's state dict is the source, with every
    # name): merge writes a tied key back only where the source stored it
    stored: set[str] | None = field(default=None, repr=False)
    # produces the side files (a GGUF source: config, tokenizer, metadata) -> (files, warnings)
    export: Callable[[Path], tuple[list[str], list[str]]] | None = field(default=None, repr=False)
    # the content hash being computed beside the work (open_lazy); finish_hash() fills sha256 from it
    digest: Digest | None = field(default=None, repr=False, compare=False)

    def finish_hash(self) -> None:
        """Fill ``sha256`` from the background :class:`Digest` (waits for what is left of it)."""
        if self.sha256 is None and self.digest is not None:
            self.sha256 = self.digest.result()

    def cancel_hash(self) -> None:
        """Stop the background hash (a dry run; a source loaded another way)."""
        if self.digest is not None:
            self.digest.cancel()

    def to_dict(self) -> dict:
        return {"kind": self.kind, "path": self.path, "arch": self.arch, "sha256": self.sha256}

    def write_files(self, directory: Path, files_dir: Path | None = None) -> list[str]:
        """Put the side files into ``directory``: copied from ``files_dir`` (default: the source
        directory of an HF source), or produced from the source (GGUF). Returns warnings."""
        if files_dir is None and self.export is not None:
            self.files, warnings = self.export(directory)
            return warnings
        origin = files_dir or (Path(self.path) if self.kind == "hf" and self.path else None)
        for name in self.files if origin is not None else []:  # checked again: the directory may have changed
            shutil.copy2(confined(Path(origin), name, "side file"), Path(directory) / name)
        return []


def import_arch(ref: str):
    """Resolve ``"pkg.module:callable"`` (e.g. ``torchvision.models:resnet50``)."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise LorsUsageError(f"--arch must look like 'package.module:callable', got {ref!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise LorsUsageError(f"--arch {ref!r}: cannot import {module_name!r} ({e})") from None
    target = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise LorsUsageError(f"--arch {ref!r}: {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise LorsUsageError(f"--arch {ref!r} is not callable")
    return target


def build_arch(ref: str, device: str | torch.device = "cpu") -> nn.Module:
    factory = import_arch(ref)
    try:
        with torch.device(device):
            model = factory()
    except Exception as e:  # user code: report it on one line
        raise LorsError(f"--arch {ref!r} failed to build the model: {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise LorsError(f"--arch {ref!r} returned {type(model).__name__}, not a torch nn.Module")
    return model


# ---------------------------------------------------------------------------------------------
# state dicts


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a weights-only ``torch.save`` of a state dict."""
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    obj = _torch_load(path, trust_pickle=False)
    state = _as_state_dict(obj)
    if state is None:
        raise LorsError(f"{path}: expected a state dict (name -> tensor), found {_describe(obj)}")
    return state


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    _check_file(path)
    try:
        return load_file(str(path))
    except Exception as e:
        raise LorsError(f"{path}: not a readable safetensors file ({short(e)})") from None


def _check_file(path: Path) -> None:
    if not path.exists():  # a wrong path is a usage error (exit 2), like a wrong flag
        raise LorsUsageError(f"{path}: no such file or directory")
    if path.is_dir():
        raise LorsError(f"{path}: is a directory without config.json (not a Hugging Face model directory)")
    if path.stat().st_size == 0:
        raise LorsError(f"{path}: file is empty")


def _describe(obj) -> str:
    if isinstance(obj, dict):
        kinds = sorted({type(v).__name__ for v in obj.values()})[:3]
        return f"a dict of {', '.join(kinds) or 'nothing'}"
    return f"a {type(obj).__name__}"


def _as_state_dict(obj) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # common training checkpoints
    if (
        isinstance(obj, dict)
        and obj
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        return dict(obj)
    return None


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def read_torch_file(path: Path):
    """The object of a ``torch.save`` file, read with ``weights_only=True`` (tensors, containers):
    one-line errors for pickles that would run code and for unreadable files."""
    return _torch_load(Path(path), trust_pickle=False)


def _torch_load(path: Path, trust_pickle: bool):
    _check_file(path)
    try:
        with warnings.catch_warnings():  # torch warns on legacy pickles: keep stderr to our one line
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        message = str(e)
        if (
            not trust_pickle and "GLOBAL" in message
        ):  # "Unsupported global: GLOBAL x" or "GLOBAL x ... is blocked"
            culprit = ""
            for line in message.splitlines():
                if "GLOBAL" in line:
                    culprit = (line.split("GLOBAL", 1)[-1].split() or [""])[0]
                    break
            what = f" (it references {culprit})" if culprit else ""
            raise LorsError(
                f"{path}: refused to unpickle Python objects{what}: unpickling runs code from the file. "
                f"Pass {PICKLE_FLAG} only if you trust its origin, or save a state dict and use --arch"
            ) from None
        detail = message.split("WeightsUnpickler error:", 1)[-1].split("Check the documentation")[0]
        raise LorsError(f"{path}: not a readable PyTorch file ({short(detail)})") from None
    except Exception as e:
        raise LorsError(f"{path}: not a readable PyTorch file ({short(e)})") from None


def check_finite(model: nn.Module, path: str | Path) -> None:
    """Refuse a source with NaN or Inf in any floating tensor (stacked or not), naming the tensor."""
    for name, t in model.state_dict().items():
        refuse_non_finite(t, name, path)


def refuse_non_finite(t: torch.Tensor, name: str, path: str | Path) -> None:
    if not all_finite(t):
        raise LorsError(f"{path}: tensor {name!r} contains NaN or Inf values; refusing to convert it")


# ---------------------------------------------------------------------------------------------
# the entry point


def load_source(
    path: str | Path, arch: str | None = None, trust_pickle: bool = False
) -> tuple[nn.Module, SourceInfo]:
    """Load a dense model from any supported input and say where it came from."""
    path = Path(path)
    recover_output(path)  # an output of lors (merge) whose replacement was killed half-way
    if is_hf_dir(path):
        files = hf_weight_files(path)
        stored = set(SafetensorsReader(files).keys())
        model = load_hf(path, stored)
        check_finite(model, path)
        # hashed here, not on a thread beside the load, which raises the peak RSS of a calibrated
        # conversion for a saving of under a second
        return model, SourceInfo(
            kind="hf",
            path=str(path.resolve()),
            arch=type(model).__name__,
            sha256=file_sha256(files),
            files=hf_side_files(path),
            stored=stored,
        )
    if is_gguf(path):
        return load_gguf(path, arch)
    _check_file(path)
    sha = file_sha256([path])
    if arch is not None:
        state = read_state_dict(path)
        model = build_arch(arch)
        for name, t in model.state_dict(keep_vars=True).items():
            if name not in state:
                continue
            if tuple(state[name].shape) != tuple(t.shape):
                raise LorsError(
                    f"{path} does not match --arch {arch}: {name} has shape {list(state[name].shape)}, "
                    f"the model expects {list(t.shape)}"
                )
            if t.is_floating_point() and state[name].is_floating_point() and t.dtype != state[name].dtype:
                t.data = t.data.to(state[name].dtype)  # keep the source dtype (fp16/bf16 stay so); ties kept
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise LorsError(
                f"{path} does not match --arch {arch}: missing {result.missing_keys[:3]}, "
                f"unexpected {result.unexpected_keys[:3]}"
            )
        check_finite(model, path)
        return model.eval(), SourceInfo(
            kind="state_dict", path=str(path.resolve()), arch=arch, sha256=sha, stored=set(state)
        )
    if path.suffix == ".safetensors":
        _read_safetensors(path)  # a clear error for corrupt files before the usage hint
        raise LorsUsageError(
            f"{path} holds only tensors: pass --arch package.module:callable to build the model"
        )
    if _is_torchscript(path):
        try:
            model = torch.jit.load(str(path), map_location="cpu")
        except Exception as e:
            raise LorsError(f"{path}: not a loadable TorchScript archive ({short(e)})") from None
        check_finite(model, path)
        return model, SourceInfo(kind="torchscript", path=str(path.resolve()), sha256=sha)
    obj = _torch_load(path, trust_pickle=trust_pickle)
    if isinstance(obj, nn.Module):
        check_finite(obj, path)
        return obj.eval(), SourceInfo(kind="pickle", path=str(path.resolve()), sha256=sha)
    if _as_state_dict(obj) is not None:
        raise LorsUsageError(
            f"{path} is a state dict: pass --arch package.module:callable to build the model"
        )
    raise LorsError(f"{path}: expected a model or a state dict, found {_describe(obj)}")


def open_lazy(
    path: str | Path, arch: str | None = None
) -> tuple[nn.Module, SafetensorsReader, SourceInfo] | None:
    """(meta-device model, lazy tensors, source info) for an HF directory, ``.safetensors`` +
    ``arch`` or a GGUF file; None for any other input (it must be loaded whole).

    The info's ``sha256`` is being computed on a thread of its own (``info.digest``) while the
    skeleton is built: :meth:`SourceInfo.finish_hash` waits for it, :meth:`SourceInfo.cancel_hash` stops it.
    """
    src = Path(path)
    recover_output(src)
    if is_hf_dir(src):
        tensors = SafetensorsReader(hf_weight_files(src))
        digest = Digest(tensors.files)
        model = empty_model(lambda: build_hf(src, device="cpu", keys=set(tensors.keys())))
        return (
            model,
            tensors,
            SourceInfo(
                kind="hf",
                path=str(src.resolve()),
                arch=type(model).__name__,
                files=hf_side_files(src),
                digest=digest,
            ),
        )
    if src.suffix == ".safetensors" and arch is not None and src.is_file():
        _check_file(src)  # an empty file says so, not "header too small"
        tensors = SafetensorsReader([src])
        digest = Digest([src])
        model = empty_model(lambda: build_arch(arch))
        return (
            model,
            tensors,
            SourceInfo(kind="state_dict", path=str(src.resolve()), arch=arch, digest=digest),
        )
    if is_gguf(src):
        return open_gguf(src, arch)
    return None


# ---------------------------------------------------------------------------------------------
# GGUF files


def open_gguf(path: Path, arch: str | None = None):
    """(meta-device model, lazy dequantized tensors, source info) of a GGUF file: the transformers
    causal LM its metadata describes, tied weights tied."""
    if arch is not None:
        raise LorsUsageError(
            f"{path}: --arch does not apply to a GGUF file (its metadata names the architecture)"
        )
    gguf = GGUFFile(path)
    digest = Digest([path])
    config = load_config(gguf)
    from transformers import AutoModelForCausalLM

    try:
        model = empty_model(lambda: AutoModelForCausalLM.from_config(config))
    except Exception as e:
        raise LorsError(
            f"{path}: transformers cannot build the model its GGUF metadata describes ({short(e)})"
        ) from None
    config.architectures = [type(model).__name__]  # config.json names the class, as a saved HF model's does
    state = model.state_dict(keep_vars=True)
    first: dict[int, str] = {}
    tied = [k for k, t in state.items() if first.setdefault(id(t), k) != k]
    tensors = GGUFTensors(gguf, {k: tuple(t.shape) for k, t in state.items()}, tied, type(model).__name__)
    info = SourceInfo(
        kind="gguf",
        path=str(path.resolve()),
        arch=type(model).__name__,
        stored=set(tensors.keys()),
        digest=digest,
        export=lambda directory: export_side_files(gguf, config, tensors.extras, directory),
    )
    return model, tensors, info


def load_gguf(path: Path, arch: str | None = None) -> tuple[nn.Module, SourceInfo]:
    """A GGUF file's model with every tensor dequantized (float32)."""
    model, tensors, info = open_gguf(path, arch)
    model.load_state_dict({k: tensors.get(k) for k in tensors.keys()}, strict=False, assign=True)
    model.tie_weights()  # assign replaced the tied parameter's owner only
    left = [
        n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"
    ]
    if left:
        raise LorsError(f"{path}: no tensor for {left[0]!r}")
    check_finite(model, path)
    info.finish_hash()
    return model.eval(), info
