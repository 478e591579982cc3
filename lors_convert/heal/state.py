"""The resumable heal state: one file with the trainable tensors, the optimizer, the progress made, the
best state so far and the settings it was made with, written to a temporary file then renamed.

A state left by other settings (or another model, or another version of lors) is refused with a
message saying how to start afresh, or discarded with ``restart``; never resumed silently.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from ..calibrate.batches import Batch
from ..errors import LorsError, LorsUsageError, short

STATE_VERSION = 3  # 3: token and time progress, phase, the best state and the evaluations
AFRESH = "to start afresh, delete it or pass --force (restart=True)"


def data_digest(batches: Sequence[Batch]) -> str:
    """sha256 over every batch's tensors (names, dtypes, shapes, bytes): the data's identity."""
    digest = hashlib.sha256()
    for batch in batches:
        items = sorted(batch.items()) if isinstance(batch, dict) else [("", batch)]
        for name, t in items:
            if not isinstance(t, torch.Tensor):
                digest.update(repr((name, t)).encode())
                continue
            flat = t.detach().cpu().contiguous().reshape(-1)
            digest.update(repr((name, str(t.dtype), tuple(t.shape))).encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def save_state(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save({"version": STATE_VERSION, **state}, tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise LorsError(f"{path}: cannot write the heal state ({e.strerror or e})") from None


def _why_not(state: dict, config: dict, names: set[str]) -> str | None:
    version, recorded = state.get("version"), state.get("config")
    if version != STATE_VERSION or not isinstance(recorded, dict):
        return f"it was written by another version of lors (state version {version!r})"
    if recorded != config:
        changed = [k for k in sorted(set(config) | set(recorded)) if recorded.get(k) != config.get(k)]
        said = ("data" if k == "data" else f"{k} {recorded.get(k)!r} -> {config.get(k)!r}" for k in changed)
        return "it was left by a different command (" + ", ".join(said) + ")"
    if not isinstance(state.get("trainable"), dict) or sorted(state["trainable"]) != sorted(names):
        return "it was left for another model (different trainable parameters)"
    return None


def read_state(path: Path, where: torch.device, config: dict, names: set[str], restart: bool) -> dict | None:
    """The state to resume from: None when there is none (or ``restart`` discards one left by other
    settings); a one-line error for a state that cannot be read or was left by another command."""
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise LorsUsageError(f"{path}: the heal state is not a regular file; remove it")
    if not path.exists():
        return None
    try:
        with warnings.catch_warnings():  # torch warns about odd pickles: stderr keeps to one line
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=where, weights_only=True)
        why = _why_not(state, config, names)
    except Exception as e:  # noqa: BLE001 - truncated, not a torch file, not a dict
        why = f"cannot read the heal state ({short(e) or type(e).__name__})"
        if restart:
            return None
        raise LorsUsageError(f"{path}: {why}; {AFRESH}") from None
    if why is None:
        return state
    if restart:
        return None
    raise LorsUsageError(f"{path}: not resuming the heal state: {why}; {AFRESH}")


__all__ = ["STATE_VERSION", "AFRESH", "data_digest", "save_state", "read_state"]
