"""Calibration inputs from files: text lines tokenized with the model's tokenizer, or tensor files,
split into batches to fit on and disjoint batches held out for measuring fidelity.

- a text file (one sample per line, UTF-8) for Hugging Face text models: :func:`read_texts`,
  :func:`text_batches`;
- a tensor file for anything else, ``.safetensors`` or ``.pt``/``.pth`` (read with
  ``weights_only=True``): :func:`tensor_batches`; a single tensor is split along dim 0, a dict of
  tensors becomes keyword batches (``input_ids``, ``attention_mask``, ...).

Every file is refused with one :class:`LorsError` line before any model runs when it cannot be
what it claims: not a regular file, binary or non-UTF-8 text, a line too long to be one sample,
unreadable tensors, NaN or Inf inputs, samples that disagree in number.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LorsError, LorsUsageError, about, short
from ..finite import all_finite
from ..io.hf import load_tokenizer
from ..io.sources import read_torch_file
from .batches import Batch

TENSOR_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
MAX_LINE_CHARS = 1_000_000  # one sample per line: a longer line is a document or a binary, not a sample
HELDOUT_DEFAULT = 0.2  # share of the samples held out when no held-out file is given


def check_data_file(path: Path, what: str = "calibration data") -> Path:
    """``path`` if it is an existing regular file (not a directory, FIFO or device), else a usage error."""
    path = Path(path)
    if not path.exists():
        raise LorsUsageError(f"{what} {str(path)!r} does not exist")
    if not path.is_file():
        raise LorsUsageError(
            f"{path}: {what} must be a regular file (a text or tensor file), not "
            f"{'a directory' if path.is_dir() else 'a special file'}"
        )
    return path


def read_texts(path: str | Path) -> list[str]:
    """Non-empty, stripped lines of a UTF-8 text file (``#`` starts no comment: text is text)."""
    path = check_data_file(Path(path))
    data = path.read_bytes()
    nul = data.find(b"\x00")
    if nul >= 0:
        raise LorsError(
            f"{path}: binary data (a NUL byte at offset {nul}), not text: give UTF-8 text, one "
            "sample per line, or a .safetensors/.pt file of model inputs"
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise LorsError(
            f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}): convert it "
            "to UTF-8 (e.g. iconv -t utf-8)"
        ) from None
    texts = []
    for number, line in enumerate(text.splitlines(), 1):
        if len(line) > MAX_LINE_CHARS:
            raise LorsError(
                f"{path}: line {number} has {len(line)} characters (at most {MAX_LINE_CHARS}): "
                "calibration text is one sample per line, and only a line's first tokens are used"
            )
        if line.strip():
            texts.append(line.strip())
    if not texts:
        raise LorsError(f"{path}: no text lines")
    return texts


def text_batches(tokenizer, texts: Sequence[str], batch_size: int = 16, max_length: int = 128) -> list[dict]:
    """Tokenize ``texts`` into padded keyword batches (``input_ids``, ``attention_mask``, ...).

    A tokenizer without a padding token (GPT-2's) pads with its end-of-text token, or with token 0:
    padded positions are masked out, so any id the model can embed will do. The texts are batched
    in order of their token count (a stable sort), so a batch pads little (docs/benchmarks.md, "Text
    batches in length order"). Every use sums or averages over samples, so the order changes
    results only at rounding."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = (
            tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.convert_ids_to_tokens(0)
        )
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    texts = [texts[i] for i in sorted(range(len(texts)), key=lambda i: len(ids[i]))]
    batches = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        batches.append(dict(enc))
    return batches


def read_tensors(path: str | Path) -> torch.Tensor | dict[str, torch.Tensor]:
    """Inputs from ``.safetensors`` or a ``.pt`` file (``weights_only=True``): a tensor or a dict,
    samples along dim 0, floating values finite."""
    path = check_data_file(Path(path))
    if path.stat().st_size == 0:
        raise LorsError(f"{path}: file is empty")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            data = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise LorsError(f"{path}: not a readable safetensors file ({short(e)})") from None
    else:  # weights_only: a pickle that would run code is refused, never unpickled
        data = read_torch_file(path)
    if isinstance(data, (list, tuple)) and data and all(isinstance(t, torch.Tensor) for t in data):
        data = (
            torch.cat([t if t.dim() else t[None] for t in data])
            if len({tuple(t.shape[1:]) for t in data}) == 1
            else {str(i): t for i, t in enumerate(data)}
        )
    if isinstance(data, Mapping):
        data = dict(data)
        if len(data) == 1 and next(iter(data)) in ("input", "inputs", "x"):
            data = next(iter(data.values()))
        elif not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise LorsError(f"{path}: expected a tensor or a dict of tensors")
    if not isinstance(data, torch.Tensor) and not isinstance(data, dict):
        raise LorsError(f"{path}: expected a tensor or a dict of tensors, got {type(data).__name__}")
    for name, t in data.items() if isinstance(data, dict) else [("input", data)]:
        if t.dim() == 0:
            raise LorsError(f"{path}: tensor {name!r} is a scalar: inputs need samples along dim 0")
        if not all_finite(t):
            raise LorsError(f"{path}: tensor {name!r} contains NaN or Inf values")
    with about(path):
        n_samples(data)
    return data


def n_samples(data: torch.Tensor | dict[str, torch.Tensor]) -> int:
    if isinstance(data, torch.Tensor):
        return int(data.shape[0])
    sizes = {int(v.shape[0]) for v in data.values()}
    if len(sizes) != 1:
        raise LorsError(f"input tensors disagree on the number of samples: {sorted(sizes)}")
    return sizes.pop()


def tensor_batches(
    data: torch.Tensor | dict[str, torch.Tensor], batch_size: int = 16, index: Sequence[int] | None = None
) -> list[Batch]:
    """Split samples (dim 0) into batches; ``index`` selects and orders the samples."""
    n = n_samples(data)
    index = list(range(n)) if index is None else list(index)
    out: list[Batch] = []
    for start in range(0, len(index), batch_size):
        sel = torch.tensor(index[start : start + batch_size], dtype=torch.long)
        if isinstance(data, torch.Tensor):
            out.append(data[sel])
        else:
            out.append({k: v[sel] for k, v in data.items()})
    return out


def split_heldout(n: int, heldout: float = HELDOUT_DEFAULT, seed: int = 0) -> tuple[list[int], list[int]]:
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
    heldout_file: str = ""  # the held-out file; "" when the held-out samples are split off ``source``
    heldout_fraction: float = 0.0  # the share of ``source`` held out (0 with a held-out file)
    probes: int | None = None  # output-gradient probes per batch it calls for (None: the default)

    @property
    def heldout_origin(self) -> str:
        """The file the held-out samples come from."""
        return self.heldout_file or self.source

    def summary(self) -> dict:
        """What the report says about the data: samples fitted, samples held out and where from."""
        where = self.heldout_file or f"{self.heldout_fraction:.0%} of {self.source}"
        return {
            "calibration_data": self.source,
            "calibration_kind": self.kind,
            "calibration_samples": self.n_calibration,
            "heldout_samples": self.n_heldout,
            "heldout_data": where,
        }


def resolve_heldout(heldout: float | None, heldout_path) -> float:
    """The share of the samples to hold out: ``heldout`` checked, or its default (0.2; 0 when a
    held-out file is given, which replaces the split)."""
    if heldout is None:
        return 0.0 if heldout_path is not None else HELDOUT_DEFAULT
    if not 0.0 <= heldout < 1.0:
        raise LorsUsageError(f"--heldout-fraction must be in [0, 1), got {heldout}")
    if heldout_path is not None and heldout > 0:
        raise LorsUsageError(
            f"--heldout-fraction {heldout:g} with --heldout: the held-out file replaces the "
            "split (leave the fraction at 0)"
        )
    if heldout_path is None and heldout == 0:
        raise LorsUsageError(
            "--heldout-fraction 0 holds nothing back: give --heldout FILE to measure on, "
            "or a fraction above 0"
        )
    return heldout


def load_calibration(
    path: str | Path,
    tokenizer=None,
    batch_size: int = 16,
    max_length: int = 128,
    heldout: float | None = None,
    heldout_path: str | Path | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> CalibrationData:
    """Read calibration inputs and split off a held-out part (or read it from ``heldout_path``).

    Tensor files (``.safetensors``, ``.pt``, ``.pth``, ``.bin``) are taken as model inputs; anything
    else as text, one sample per line, which needs the model's ``tokenizer``. ``heldout`` is the
    share of the samples held out (default 0.2; with ``heldout_path`` 0, the file replaces the
    split); a split must leave at least one sample on each side. ``limit`` caps the number of
    calibration samples (after the split).
    """
    path = check_data_file(Path(path))
    if heldout_path is not None:
        check_data_file(Path(heldout_path), "held-out data")
    fraction = resolve_heldout(heldout, heldout_path)
    held_from = (str(heldout_path) if heldout_path is not None else "", fraction)
    if path.suffix in TENSOR_SUFFIXES:
        data = read_tensors(path)
        n = n_samples(data)
        if heldout_path is not None:
            held_data = read_tensors(heldout_path)
            calib_idx = list(range(n))[:limit]
            return CalibrationData(
                tensor_batches(data, batch_size, calib_idx),
                tensor_batches(held_data, batch_size),
                "tensor",
                str(path),
                len(calib_idx),
                n_samples(held_data),
                *held_from,
            )
        calib_idx, held_idx = _split(path, n, fraction, seed)
        calib_idx = calib_idx[:limit]
        return CalibrationData(
            tensor_batches(data, batch_size, calib_idx),
            tensor_batches(data, batch_size, held_idx),
            "tensor",
            str(path),
            len(calib_idx),
            len(held_idx),
            *held_from,
        )
    if tokenizer is None:
        raise LorsUsageError(
            f"{path}: text calibration data needs a tokenizer (a Hugging Face text model); "
            "for other models give a tensor file (.safetensors or .pt) of inputs"
        )
    texts = read_texts(path)
    if heldout_path is not None:
        held_texts = read_texts(heldout_path)
        calib_texts = texts[:limit]
    else:
        calib_idx, held_idx = _split(path, len(texts), fraction, seed)
        calib_texts = [texts[i] for i in calib_idx][:limit]
        held_texts = [texts[i] for i in held_idx]
    overlap = set(calib_texts) & set(held_texts)
    if overlap:
        held_texts = [t for t in held_texts if t not in overlap]
    return CalibrationData(
        text_batches(tokenizer, calib_texts, batch_size, max_length),
        text_batches(tokenizer, held_texts, batch_size, max_length) if held_texts else [],
        "text",
        str(path),
        len(calib_texts),
        len(held_texts),
        *held_from,
    )


def _split(path: Path, n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    if fraction > 0 and n < 2:
        raise LorsError(
            f"{path}: {n} sample(s), too few to hold some out for measuring: give more samples, "
            "or a held-out file (--heldout)"
        )
    return split_heldout(n, fraction, seed)


__all__ = [
    "CalibrationData",
    "read_texts",
    "text_batches",
    "read_tensors",
    "tensor_batches",
    "split_heldout",
    "load_calibration",
    "TENSOR_SUFFIXES",
    "check_data_file",
    "HELDOUT_DEFAULT",
]


def read_calibration(
    data: Path,
    tokenizer_dir: Path,
    text_model: bool,
    heldout: Path | None = None,
    heldout_fraction: float | None = None,
) -> CalibrationData:
    """Calibration inputs from a file; text files are tokenized with the tokenizer in ``tokenizer_dir``
    (or in a GGUF file's metadata; ``text_model``: the model is a Hugging Face model, whose directory
    should hold one). ``heldout_fraction``: see :func:`load_calibration`."""
    tokenizer = None
    check_data_file(Path(data))
    if Path(data).suffix not in TENSOR_SUFFIXES:
        if not text_model and not (tokenizer_dir / "tokenizer.json").is_file():
            raise LorsUsageError(
                f"{data}: text calibration needs a Hugging Face text model (its tokenizer); "
                "give a .safetensors/.pt file of model inputs instead"
            )
        tokenizer = load_tokenizer(tokenizer_dir)
    return load_calibration(data, tokenizer=tokenizer, heldout_path=heldout, heldout=heldout_fraction)
