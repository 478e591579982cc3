"""Which inputs a conversion is measured on when the user gives none, and the text lors ships for it.

``lors_convert/data/probe.txt`` (held-out probes: dialogue, reviews and emails, code comments,
questions) and ``calibrate.txt`` (default calibration text: encyclopedic prose, news, instructions,
narrative) were written for lors, of deliberately different kinds; see ``lors_convert/data/README.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import LorsUsageError
from ..io.hf import has_tokenizer, load_tokenizer
from .batches import Batch
from .data import TENSOR_SUFFIXES, read_tensors, read_texts, tensor_batches, text_batches

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
PROBE_TEXT = DATA_DIR / "probe.txt"
CALIBRATION_TEXT = DATA_DIR / "calibrate.txt"
SYNTHETIC_IMAGES = 16  # random-normal images at the config's size, seeded
PROBE_LABEL = "lors probe text (shipped)"  # what reports call PROBE_TEXT (heal reuses figures so labelled)


@dataclass
class Probes:
    """Held-out inputs to measure fidelity on, or why there are none."""

    batches: list[Batch] = field(default_factory=list)
    label: str = ""  # where they come from, for the report
    synthetic: bool = False  # made up, not real data
    why_none: str | None = None  # set when ``batches`` is empty
    origin: str | None = None  # the file they were read from: names it in errors


def read_probes(path: Path, tokenizer_dir: Path | None) -> Probes:
    """Held-out inputs from a file: a tensor file as is, text tokenized with the model's tokenizer."""
    if path.suffix in TENSOR_SUFFIXES:
        return Probes(tensor_batches(read_tensors(path)), f"{path.name} (--heldout)", origin=str(path))
    if tokenizer_dir is None:
        raise LorsUsageError(
            f"{path}: text held-out inputs need a Hugging Face text model (its tokenizer); "
            "give a .safetensors/.pt file of model inputs instead"
        )
    return Probes(
        text_batches(load_tokenizer(tokenizer_dir), read_texts(path)),
        f"{path.name} (--heldout)",
        origin=str(path),
    )


def default_probes(model_dir: Path | None, config=None) -> Probes:
    """The shipped English probe text for a Hugging Face text model (``model_dir`` holds its
    tokenizer), synthetic images for a vision model (``config`` with ``image_size`` and
    ``num_channels``), else none, with the reason."""
    if model_dir is not None and has_tokenizer(model_dir):
        texts = read_texts(PROBE_TEXT)
        return Probes(
            text_batches(load_tokenizer(model_dir), texts),
            PROBE_LABEL,
            origin=str(PROBE_TEXT),
        )
    size, channels = getattr(config, "image_size", None), getattr(config, "num_channels", None)
    if isinstance(size, (int, tuple, list)) and isinstance(channels, int):
        h, w = (size, size) if isinstance(size, int) else tuple(size)[:2]
        images = torch.randn(SYNTHETIC_IMAGES, channels, h, w, generator=torch.Generator().manual_seed(0))
        return Probes(
            tensor_batches({"pixel_values": images}, batch_size=8),
            f"{SYNTHETIC_IMAGES} synthetic {h}x{w} images (random normal)",
            synthetic=True,
        )
    return Probes(
        why_none="no held-out inputs for this kind of model: give --heldout FILE (model inputs as "
        ".safetensors/.pt) or --calibrate DATA"
    )


__all__ = ["Probes", "read_probes", "default_probes", "PROBE_TEXT", "PROBE_LABEL", "CALIBRATION_TEXT"]
