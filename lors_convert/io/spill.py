"""Spilling tensors to disk: named groups of tensors written once and read back when needed.

Knows nothing of LORS. A :class:`Spill` is a private temporary directory (next to the output, so on
the disk the user chose; removed on :meth:`Spill.close` or garbage collection) holding one
safetensors file per name. Used where a whole model's worth of intermediate tensors (calibration
Grams, a reference model's outputs) would otherwise sit in memory at once.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


PREFIX = ".lors-spill-"


class Spill:
    """A temporary directory of named tensor groups (``{tensor name: tensor}`` per name).

    Its name carries the process id, so that one left behind by a killed process (gigabytes of Grams
    for a large model, in a hidden directory) is removed by the next spill made next to it."""

    def __init__(self, near: str | Path | None = None):
        parent = Path(near) if near is not None else None
        if parent is not None and not parent.is_dir():
            parent = None  # an output directory not made yet: its parent is checked by the caller
        prefix = f"{PREFIX}{os.getpid()}-"
        try:
            self._dir = tempfile.TemporaryDirectory(prefix=prefix, dir=parent)
        except OSError:  # not writable there (a dry run's output directory): the system's temp
            self._dir = tempfile.TemporaryDirectory(prefix=prefix)
        remove_orphans(Path(self._dir.name).parent)
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


def remove_orphans(directory: Path) -> list[Path]:
    """Remove the spills in ``directory`` whose process is gone; returns what was removed."""
    removed = []
    for entry in directory.glob(PREFIX + "*"):
        pid = entry.name[len(PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)) or not entry.is_dir() or entry.is_symlink():
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


__all__ = ["Spill", "remove_orphans"]
