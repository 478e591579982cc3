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

from .atomic import owner_tag, sweep_dead_owners

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


PREFIX = ".lors-spill-"


class Spill:
    """A temporary directory of named tensor groups (``{tensor name: tensor}`` per name).

    Its name carries its owner (:func:`~.atomic.owner_tag`), so that one left behind by a killed
    process (gigabytes of Grams for a large model, in a hidden directory) is removed by the next spill
    made next to it (:func:`~.atomic.sweep_dead_owners`, as for the atomic outputs' temporaries)."""

    def __init__(self, near: str | Path | None = None):
        parent = Path(near) if near is not None else None
        if parent is not None and not parent.is_dir():
            parent = None  # an output directory not made yet: its parent is checked by the caller
        prefix = PREFIX + owner_tag()
        try:
            self._dir = tempfile.TemporaryDirectory(prefix=prefix, dir=parent)
        except OSError:  # not writable there (a dry run's output directory): the system's temp
            self._dir = tempfile.TemporaryDirectory(prefix=prefix)
        self.path = Path(self._dir.name)
        sweep_dead_owners(self.path.parent, PREFIX)
        self._files: dict[str, Path] = {}

    def put(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        path = self.path / f"{len(self._files)}-{_SAFE.sub('_', name)[:80]}.safetensors"
        save_file({k: t.detach().contiguous().cpu() for k, t in tensors.items()}, str(path))
        self._files[name] = path

    def get(self, name: str) -> dict[str, torch.Tensor]:
        return load_file(str(self._files[name]))

    def __len__(self) -> int:
        return len(self._files)

    def close(self) -> None:
        self._dir.cleanup()


__all__ = ["PREFIX", "Spill"]
