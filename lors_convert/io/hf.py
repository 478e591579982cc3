"""Hugging Face model directories: what they hold (weights, side files) and their architecture.

A directory is ``config.json`` plus safetensors weights (one file, or shards and an index); only
safetensors are read (``.bin`` pickles would run code). The architecture is the transformers class
``config.json`` names, built on any device (the meta device for a skeleton), or loaded whole by
transformers. The tokenizer a text model's inputs need is read from its directory, or from a GGUF
file's metadata.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import LorsError, short
from .confine import confined
from .gguf import is_gguf
from .memory import empty_model
from .safetensors import SafetensorsReader, directory_weight_files

HF_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def hf_side_files(path: Path) -> list[str]:
    """The side files (config, tokenizer) present in an HF directory, each confined to it: a side
    file that links outside the directory is refused, never read or copied into an output."""
    return [name for name in HF_SIDE_FILES if confined(path, name, "side file").is_file()]


def hf_weight_files(path: Path) -> list[Path]:
    files = directory_weight_files(path)  # an index's shards are confined to the directory
    if files is not None:
        return files
    raise LorsError(
        f"{path}: Hugging Face directory without model.safetensors (only safetensors weights "
        "are read: .bin pickles would run code)"
    )


# tried in order when config.json names no architecture: the first whose keys cover the weights
AUTO_CLASSES = (
    "AutoModel",
    "AutoModelForCausalLM",
    "AutoModelForMaskedLM",
    "AutoModelForSeq2SeqLM",
    "AutoModelForImageClassification",
)


def hf_model_class(config, keys: set[str] | None = None):
    """The transformers class of a config: the one ``architectures`` names, else the first Auto class
    whose (meta-device) state-dict keys cover ``keys``, the weight files' keys (a checkpoint saved from
    a bare config has no ``architectures``, and ``AutoModel`` would silently drop its head)."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)  # only model classes: a config must not name any callable
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    if keys:
        for name in AUTO_CLASSES:
            auto = getattr(transformers, name)
            try:
                model = empty_model(lambda auto=auto: auto.from_config(config))
            except Exception:  # not a model type this Auto class knows
                continue
            if keys <= set(model.state_dict()):
                return type(model)
    return transformers.AutoModel


def load_hf_config(path: Path):
    from transformers import AutoConfig

    confined(path, "config.json", "config")
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise LorsError(f"{path / 'config.json'}: not a usable Hugging Face config ({short(e)})") from None


def build_hf(path: Path, device: str | torch.device = "meta", keys: set[str] | None = None) -> nn.Module:
    """The architecture of an HF directory (config.json; ``keys``: the weights' names), built on ``device``."""
    config = load_hf_config(path)
    cls = hf_model_class(config, keys)
    with torch.device(device):
        if cls.__name__.startswith("Auto"):
            return cls.from_config(config)
        return cls(config)


def load_hf(path: Path, stored: set[str] | None = None) -> nn.Module:
    """The model of an HF directory, loaded by transformers; ``stored``: the weight files' keys."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress and --json output own the terminal
    hf_logging.set_verbosity_error()  # its load report would break the one-line error contract
    config = load_hf_config(path)
    if stored is None:
        stored = set(SafetensorsReader(hf_weight_files(path)).keys())  # clear error when weights are missing
    cls = hf_model_class(config, stored)
    try:
        model, info = cls.from_pretrained(
            str(path), local_files_only=True, dtype="auto", output_loading_info=True
        )
    except Exception as e:
        raise LorsError(f"{path}: transformers could not load the model ({short(e)})") from None
    # transformers fills missing or mismatched weights with a random init: never convert those
    bad = sorted(info.get("missing_keys") or []) + sorted(
        str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys") or []
    )
    if bad:
        raise LorsError(
            f"{path}: the weights do not cover the model in config.json: {bad[0]!r} is missing "
            f"or has the wrong shape ({len(bad)} in all); transformers would initialize it randomly"
        )
    return model.eval()


def has_tokenizer(directory: Path) -> bool:
    """Whether ``directory`` holds a Hugging Face tokenizer, or is a GGUF file (which carries one)."""
    directory = Path(directory)
    if directory.is_file():
        return is_gguf(directory)
    return (directory / "tokenizer_config.json").is_file() or (directory / "tokenizer.json").is_file()


def load_tokenizer(directory: Path):
    """The Hugging Face tokenizer saved in ``directory`` (whose files must lie inside it), or in a GGUF
    file's metadata (local files only)."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    try:
        if directory.is_file() and is_gguf(directory):
            return AutoTokenizer.from_pretrained(
                str(directory.parent), gguf_file=directory.name, local_files_only=True
            )
        hf_side_files(directory)  # no tokenizer file may link outside its directory
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except LorsError:
        raise
    except Exception as e:
        raise LorsError(f"{directory}: no usable tokenizer for text inputs ({short(e)})") from None


__all__ = [
    "AUTO_CLASSES",
    "HF_SIDE_FILES",
    "build_hf",
    "hf_model_class",
    "hf_side_files",
    "hf_weight_files",
    "is_hf_dir",
    "load_hf",
    "load_hf_config",
    "has_tokenizer",
    "load_tokenizer",
]
