"""Spilling tensors to disk: named groups of tensors written once and read back when needed.

Knows nothing of LORS. A :class:`Spill` is a private temporary directory (next to the output, so on
the disk the user chose; removed on :meth:`Spill.close` or garbage collection) holding one
safetensors file per name. Used where a whole model's worth of intermediate tensors (calibration
Grams, a reference model's outputs) would otherwise sit in memory at once.
"""
from __future__ import annotations

import re
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


class Spill:
    """A temporary directory of named tensor groups (``{tensor name: tensor}`` per name)."""

    def __init__(self, near: str | Path | None = None, prefix: str = ".lors-spill-"):
        parent = Path(near) if near is not None else None
        if parent is not None and not parent.is_dir():
            parent = None  # an output directory not made yet: its parent is checked by the caller
        try:
            self._dir = tempfile.TemporaryDirectory(prefix=prefix, dir=parent)
        except OSError:  # not writable there (a dry run's output directory): the system's temp
            self._dir = tempfile.TemporaryDirectory(prefix=prefix)
        self.path = Path(self._dir.name)
        self._files: dict[str, Path] = {}
        self.bytes = 0  # written so far

    def put(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        path = self.path / f"{len(self._files)}-{_SAFE.sub('_', name)[:80]}.safetensors"
        save_file({k: t.detach().contiguous().cpu() for k, t in tensors.items()}, str(path))
        self._files[name] = path
        self.bytes += sum(t.numel() * t.element_size() for t in tensors.values())

    def get(self, name: str) -> dict[str, torch.Tensor]:
        return load_file(str(self._files[name]))

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def __len__(self) -> int:
        return len(self._files)

    def close(self) -> None:
        self._dir.cleanup()


__all__ = ["Spill"]
