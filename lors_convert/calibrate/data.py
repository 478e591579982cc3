"""Calibration inputs from files: text lines tokenized with the model's tokenizer, or tensor files,
split into batches to fit on and disjoint batches held out for measuring fidelity.

- a text file (one sample per line) for Hugging Face text models: :func:`read_texts`,
  :func:`text_batches`;
- a tensor file for anything else, ``.safetensors`` or ``.pt``/``.pth`` (read with
  ``weights_only=True``): :func:`tensor_batches`; a single tensor is split along dim 0, a dict of
  tensors becomes keyword batches (``input_ids``, ``attention_mask``, ...).
"""
from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LorsError, LorsUsageError
from ..io.gguf import is_gguf
from .batches import Batch

TENSOR_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def read_texts(path: str | Path) -> list[str]:
    """Non-empty, stripped lines of a UTF-8 text file (``#`` starts no comment: text is text)."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    texts = [line for line in lines if line]
    if not texts:
        raise LorsUsageError(f"{path}: no text lines")
    return texts


def text_batches(tokenizer, texts: Sequence[str], batch_size: int = 16, max_length: int = 128) -> list[dict]:
    """Tokenize ``texts`` into padded keyword batches (``input_ids``, ``attention_mask``, ...)."""
    batches = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
        batches.append(dict(enc))
    return batches


def read_tensors(path: str | Path) -> torch.Tensor | dict[str, torch.Tensor]:
    """Inputs from ``.safetensors`` or a ``.pt`` file (``weights_only=True``): a tensor or a dict."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        data = load_file(str(path))
    else:
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - pickles of code objects etc.
            raise LorsUsageError(f"{path}: cannot read inputs with weights_only=True ({e}); save plain "
                                 "tensors or a dict of tensors") from e
    if isinstance(data, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in data):
        data = torch.cat([t if t.dim() else t[None] for t in data]) if len({tuple(t.shape[1:]) for t in data}) == 1 \
            else {str(i): t for i, t in enumerate(data)}
    if isinstance(data, Mapping):
        data = dict(data)
        if len(data) == 1 and next(iter(data)) in ("input", "inputs", "x"):
            data = next(iter(data.values()))
        elif not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise LorsUsageError(f"{path}: expected a tensor or a dict of tensors")
    elif not isinstance(data, torch.Tensor):
        raise LorsUsageError(f"{path}: expected a tensor or a dict of tensors, got {type(data).__name__}")
    return data


def n_samples(data: torch.Tensor | dict[str, torch.Tensor]) -> int:
    if isinstance(data, torch.Tensor):
        return int(data.shape[0])
    sizes = {int(v.shape[0]) for v in data.values()}
    if len(sizes) != 1:
        raise LorsUsageError(f"input tensors disagree on the number of samples: {sorted(sizes)}")
    return sizes.pop()


def tensor_batches(data: torch.Tensor | dict[str, torch.Tensor], batch_size: int = 16,
                   index: Sequence[int] | None = None) -> list[Batch]:
    """Split samples (dim 0) into batches; ``index`` selects and orders the samples."""
    n = n_samples(data)
    index = list(range(n)) if index is None else list(index)
    out: list[Batch] = []
    for start in range(0, len(index), batch_size):
        sel = torch.tensor(index[start:start + batch_size], dtype=torch.long)
        if isinstance(data, torch.Tensor):
            out.append(data[sel])
        else:
            out.append({k: v[sel] for k, v in data.items()})
    return out


def split_heldout(n: int, heldout: float = 0.2, seed: int = 0) -> tuple[list[int], list[int]]:
    """Deterministic disjoint split of ``range(n)`` into (calibration, held-out) indices."""
    if not 0.0 <= heldout < 1.0:
        raise LorsUsageError(f"held-out fraction must be in [0, 1), got {heldout}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_held = int(round(n * heldout))
    if heldout > 0 and n >= 2:
        n_held = min(max(n_held, 1), n - 1)
    held = sorted(order[:n_held])
    calib = sorted(order[n_held:])
    return calib, held


@dataclass
class CalibrationData:
    """Batches to calibrate on and disjoint batches to measure fidelity on."""

    calibration: list[Batch]
    heldout: list[Batch]
    kind: str  # "text" or "tensor"
    source: str = ""
    n_calibration: int = 0
    n_heldout: int = 0


def load_calibration(
    path: str | Path,
    tokenizer=None,
    batch_size: int = 16,
    max_length: int = 128,
    heldout: float = 0.2,
    heldout_path: str | Path | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> CalibrationData:
    """Read calibration inputs and split off a held-out part (or read it from ``heldout_path``).

    Tensor files (``.safetensors``, ``.pt``, ``.pth``, ``.bin``) are taken as model inputs; anything
    else as text, one sample per line, which needs the model's ``tokenizer``. ``limit`` caps the
    number of calibration samples (after the split).
    """
    path = Path(path)
    if not path.exists():
        raise LorsUsageError(f"calibration data {str(path)!r} does not exist")
    is_tensor = path.suffix in TENSOR_SUFFIXES
    if is_tensor:
        data = read_tensors(path)
        n = n_samples(data)
        if heldout_path is not None:
            held_data = read_tensors(heldout_path)
            calib_idx = list(range(n))[:limit]
            return CalibrationData(tensor_batches(data, batch_size, calib_idx),
                                   tensor_batches(held_data, batch_size), "tensor", str(path),
                                   len(calib_idx), n_samples(held_data))
        calib_idx, held_idx = split_heldout(n, heldout, seed)
        calib_idx = calib_idx[:limit]
        return CalibrationData(tensor_batches(data, batch_size, calib_idx),
                               tensor_batches(data, batch_size, held_idx), "tensor", str(path),
                               len(calib_idx), len(held_idx))
    if tokenizer is None:
        raise LorsUsageError(f"{path}: text calibration data needs a tokenizer (a Hugging Face text model); "
                             "for other models give a tensor file (.safetensors or .pt) of inputs")
    texts = read_texts(path)
    if heldout_path is not None:
        held_texts = read_texts(heldout_path)
        calib_texts = texts[:limit]
    else:
        calib_idx, held_idx = split_heldout(len(texts), heldout, seed)
        calib_texts = [texts[i] for i in calib_idx][:limit]
        held_texts = [texts[i] for i in held_idx]
    overlap = set(calib_texts) & set(held_texts)
    if overlap:
        held_texts = [t for t in held_texts if t not in overlap]
    return CalibrationData(text_batches(tokenizer, calib_texts, batch_size, max_length),
                           text_batches(tokenizer, held_texts, batch_size, max_length) if held_texts else [],
                           "text", str(path), len(calib_texts), len(held_texts))


__all__ = ["CalibrationData", "read_texts", "text_batches", "read_tensors", "tensor_batches", "split_heldout",
           "load_calibration", "TENSOR_SUFFIXES"]


def has_tokenizer(directory: Path) -> bool:
    """Whether ``directory`` holds a Hugging Face tokenizer, or is a GGUF file (which carries one)."""
    directory = Path(directory)
    if directory.is_file():
        return is_gguf(directory)
    return (directory / "tokenizer_config.json").is_file() or (directory / "tokenizer.json").is_file()


def load_tokenizer(directory: Path):
    """The Hugging Face tokenizer saved in ``directory``, or in a GGUF file's metadata (local files only)."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    try:
        if directory.is_file() and is_gguf(directory):
            return AutoTokenizer.from_pretrained(str(directory.parent), gguf_file=directory.name, local_files_only=True)
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:
        raise LorsError(f"{directory}: no usable tokenizer for text inputs ({e})") from None


def read_calibration(data: Path, tokenizer_dir: Path, text_model: bool, heldout: Path | None = None
                     ) -> CalibrationData:
    """Calibration inputs from a file; text files are tokenized with the tokenizer in ``tokenizer_dir``
    (or in a GGUF file's metadata; ``text_model``: the model is a Hugging Face model, whose directory
    should hold one)."""
    tokenizer = None
    if Path(data).suffix not in TENSOR_SUFFIXES:
        if not text_model and not (tokenizer_dir / "tokenizer.json").is_file():
            raise LorsUsageError(f"{data}: text calibration needs a Hugging Face text model (its tokenizer); "
                                 "give a .safetensors/.pt file of model inputs instead")
        tokenizer = load_tokenizer(tokenizer_dir)
    return load_calibration(data, tokenizer=tokenizer, heldout_path=heldout)
