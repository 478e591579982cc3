"""Spilling tensors to disk: named groups of tensors written once and read back when needed.

Knows nothing of LORS. A :class:`Spill` is a private temporary directory (next to the output, so on
the disk the user chose; removed on :meth:`Spill.close` or garbage collection) holding one
safetensors file per name. Used where a whole model's worth of intermediate tensors (calibration
Grams, a reference model's outputs, copies of a model's blocks) would otherwise sit in memory at once.
"""

from __future__ import annotations

import copy
import re
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

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


class SpilledModules(Mapping):
    """Copies of modules whose parameters wait on disk: each module's parameters go to a
    :class:`Spill` and a skeleton with them on the meta device stays in memory (its buffers are
    copied: they are small and not always in a state dict). :meth:`pop` brings one copy back, its
    parameters read from disk onto the device they were on. A walk that needs one copy at a time
    holds one module's parameters, not all of them. Iterates in the order given."""

    def __init__(self, modules: Mapping[str, nn.Module], spill: Spill):
        self.spill = spill
        self._skeletons: dict[str, tuple[nn.Module, torch.device]] = {}
        for name, module in modules.items():
            params = dict(module.named_parameters())
            device = next(iter(params.values())).device if params else torch.device("cpu")
            spill.put(f"module:{name}", params)
            meta = {id(p): nn.Parameter(p.detach().to("meta"), p.requires_grad) for p in params.values()}
            self._skeletons[name] = (copy.deepcopy(module, meta), device)

    def __getitem__(self, name: str) -> nn.Module:
        skeleton, device = self._skeletons[name]
        module = copy.deepcopy(skeleton)
        params = {k: t.to(device) for k, t in self.spill.get(f"module:{name}").items()}
        module.load_state_dict(params, strict=False, assign=True)
        return module

    def pop(self, name: str) -> nn.Module:
        """The copy of ``name``, forgotten here."""
        module = self[name]
        del self._skeletons[name]
        return module

    def __iter__(self) -> Iterator[str]:
        return iter(self._skeletons)

    def __len__(self) -> int:
        return len(self._skeletons)


__all__ = ["PREFIX", "Spill", "SpilledModules"]
