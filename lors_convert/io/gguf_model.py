"""A GGUF file in transformers' terms: its config, tokenizer, tensor names and tensor layouts.

Knows nothing of LORS. The config and the tokenizer come from transformers' own GGUF support
(``load_gguf_checkpoint``'s config, ``AutoTokenizer.from_pretrained(..., gguf_file=...)``). Tensor
names come from the ``gguf`` package's name map (``gguf.get_tensor_name_map``, the table llama.cpp's
converter names tensors with): :class:`GGUFLayout` pairs every state-dict key of the model with its
GGUF name. The one layout difference of the supported architectures is undone on reading and redone
on writing: llama.cpp stores Llama's q/k projections with the rows of each head interleaved for its
rotary embedding (``convert_hf_to_gguf.py``'s ``LlamaModel.permute``; transformers undoes it the same
way in ``modeling_gguf_pytorch_utils.LlamaTensorProcessor``). :class:`GGUFTensors` reads a GGUF's
tensors under state-dict names with the interface of
:class:`~lors_convert.io.safetensors.SafetensorsReader`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch

from ..errors import LorsError, short
from .gguf import GGUFFile, gguf_package, out_tensor, write_gguf

# GGUF architecture -> whether its q/k rows are permuted (Llama's rotary layout). Only architectures
# whose every tensor maps one to one onto the transformers model, with no other transform.
SUPPORTED = {"llama": True, "qwen2": False, "qwen3": False}
# tensors llama.cpp writes that have no place in a transformers model (rope scaling factors):
# kept for GGUF output, absent from the model
NO_PLACE = ("rope_freqs", "rope_factors_long", "rope_factors_short")
# the source's metadata, tokenizer included, and its NO_PLACE tensors: a GGUF file without weights
METADATA_NAME = "gguf_metadata.gguf"
Q_OR_K = re.compile(r"\.attn_([qk])\.(weight|bias)$")


def check_supported(gguf: GGUFFile) -> None:
    arch = gguf.architecture
    if arch not in SUPPORTED:
        raise LorsError(
            f"{gguf.path}: GGUF architecture {arch!r} is not supported (lors reads "
            f"{', '.join(sorted(SUPPORTED))})"
        )


def load_config(gguf: GGUFFile):
    """The transformers config of the file's metadata, as ``AutoConfig.from_pretrained(..., gguf_file=)``
    builds it for these architectures (called directly: that path parses the file twice)."""
    check_supported(gguf)
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        config_dict = load_gguf_checkpoint(str(gguf.path), return_tensors=False)["config"]
        return CONFIG_MAPPING[config_dict["model_type"]].from_dict(config_dict)
    except Exception as e:
        raise LorsError(
            f"{gguf.path}: transformers cannot read a config from the GGUF metadata ({short(e)})"
        ) from None


def save_tokenizer(gguf: GGUFFile, directory: Path) -> list[str]:
    """Write the tokenizer transformers builds from the file's metadata into ``directory``; returns
    the files written."""
    from transformers import AutoTokenizer

    before = set(p.name for p in directory.iterdir())
    tokenizer = AutoTokenizer.from_pretrained(
        str(gguf.path.parent), gguf_file=gguf.path.name, local_files_only=True
    )
    tokenizer.save_pretrained(str(directory))
    return sorted(p.name for p in directory.iterdir() if p.name not in before)


def export_side_files(
    gguf: GGUFFile, config, extras: list[str], directory: Path
) -> tuple[list[str], list[str]]:
    """Write into ``directory`` what a Hugging Face directory and a GGUF output need from the source:
    ``config.json``, the tokenizer files and :data:`METADATA_NAME`. Returns (files written, warnings):
    a tokenizer transformers cannot build is a warning, the weights are still usable."""
    config.save_pretrained(str(directory))
    files, warnings = ["config.json"], []
    try:
        files += save_tokenizer(gguf, directory)
    except Exception as e:
        warnings.append(
            f"no tokenizer files written: transformers cannot build a tokenizer from the GGUF "
            f"metadata ({short(e)})"
        )
    warnings += [
        f"GGUF tensor {n!r} has no place in the transformers model: kept for GGUF output only" for n in extras
    ]
    tensors = [out_tensor(n, gguf.tensors[n].shape, gguf.tensors[n].type_name) for n in extras]
    write_gguf(
        directory / METADATA_NAME, gguf.architecture, gguf.fields, tensors, ((n, gguf.raw(n)) for n in extras)
    )
    return files + [METADATA_NAME], warnings


class GGUFLayout:
    """State-dict keys <-> GGUF tensor names, and each tensor's layout change, for one architecture."""

    def __init__(self, arch: str, metadata: dict, keys: Iterable[str]):
        gguf = gguf_package()
        self.arch = arch
        self.permuted = SUPPORTED[arch]
        blocks = int(metadata.get(f"{arch}.block_count", 0))
        self.heads = metadata.get(f"{arch}.attention.head_count")
        self.kv_heads = metadata.get(f"{arch}.attention.head_count_kv", self.heads)
        kind = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), None)
        if kind is None:
            raise LorsError(f"the gguf package does not know the architecture {arch!r}")
        names = gguf.get_tensor_name_map(kind, blocks)
        self.to_gguf_name: dict[str, str] = {}
        for key in keys:
            name = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if name is not None:
                self.to_gguf_name[key] = name
        self.to_key = {v: k for k, v in self.to_gguf_name.items()}

    def _heads(self, name: str) -> int | None:
        if not self.permuted:
            return None
        m = Q_OR_K.search(name)
        if m is None:
            return None
        heads = self.heads if m.group(1) == "q" else self.kv_heads
        if not isinstance(heads, int):
            raise LorsError(f"{self.arch}: per-layer head counts are not supported")
        return heads

    def to_model(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """A tensor as the GGUF stores it -> as the model holds it. Shape unchanged."""
        heads = self._heads(name)
        if heads is None:
            return t
        # (heads * 2 * half, ...) rows as (head, half, pair) -> (head, pair, half): llama.cpp's interleave undone
        rows = t.shape[0]
        return (
            t.reshape(heads, rows // heads // 2, 2, *t.shape[1:])
            .transpose(1, 2)
            .reshape(t.shape)
            .contiguous()
        )

    def to_file(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`to_model`: llama.cpp's ``permute``."""
        heads = self._heads(name)
        if heads is None:
            return t
        rows = t.shape[0]
        return (
            t.reshape(heads, 2, rows // heads // 2, *t.shape[1:])
            .transpose(1, 2)
            .reshape(t.shape)
            .contiguous()
        )


class GGUFTensors:
    """A GGUF file's tensors under the model's state-dict names, dequantized to float32 on :meth:`get`.

    ``keys`` are the model's state-dict keys: each stored one must have its tensor in the file, with
    the model's shape, and every tensor of the file must have its key (but :data:`NO_PLACE` ones,
    listed in :attr:`extras`). ``aliases`` (tied keys, e.g. ``lm_head.weight``) may be absent.
    """

    def __init__(
        self, gguf: GGUFFile, keys: dict[str, tuple[int, ...]], aliases: Iterable[str], model_name: str
    ):
        self.gguf = gguf
        self.files = [gguf.path]
        self.layout = GGUFLayout(gguf.architecture, gguf.values, keys)
        self.shapes: dict[str, tuple[int, ...]] = {}
        aliases = set(aliases)
        for key, name in self.layout.to_gguf_name.items():
            if name in gguf.tensors:
                self.shapes[key] = gguf.tensors[name].shape
        self.extras = [n for n in gguf.tensors if n not in self.layout.to_key and n.split(".")[0] in NO_PLACE]
        where = f"{gguf.path}: the {model_name} its metadata describes"
        for name in gguf.tensors:
            if name not in self.layout.to_key and name not in self.extras:
                raise LorsError(
                    f"{where} has no place for tensor {name!r} "
                    f"({gguf.architecture}.block_count is {gguf.get(gguf.architecture + '.block_count')})"
                )
        for key, shape in keys.items():
            if key in aliases:
                continue
            if key not in self.shapes:
                name = self.layout.to_gguf_name.get(key, "?")
                raise LorsError(
                    f"{where} needs {key!r}, and the file has no tensor {name!r} for it "
                    f"({len(gguf.tensors)} tensors in the file)"
                )
            if tuple(self.shapes[key]) != tuple(shape):
                raise LorsError(
                    f"{where} expects {key!r} with shape {list(shape)}, tensor "
                    f"{self.layout.to_gguf_name[key]!r} has {list(self.shapes[key])}"
                )

    def __contains__(self, key: str) -> bool:
        return key in self.shapes

    def keys(self) -> list[str]:
        return list(self.shapes)

    def dtype(self, key: str) -> torch.dtype:
        return torch.float32  # every type is read dequantized to float32

    def get(self, key: str) -> torch.Tensor:
        if key not in self.shapes:
            raise LorsError(f"tensor {key!r} is not in {self.gguf.path}")
        name = self.layout.to_gguf_name[key]
        return self.layout.to_model(name, torch.from_numpy(self.gguf.read(name)))


__all__ = [
    "GGUFLayout",
    "GGUFTensors",
    "SUPPORTED",
    "METADATA_NAME",
    "export_side_files",
    "load_config",
    "save_tokenizer",
    "check_supported",
]
