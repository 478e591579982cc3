"""``save_pretrained`` on a LORS model: transformers' method answered with a LORS checkpoint.

A transformers model with LORS layers inherits ``PreTrainedModel.save_pretrained``, which would
write the layers' state under names no dense model has (and ``from_pretrained`` would fill the dense
weights it misses with random values). :func:`enable_save_pretrained` replaces the method on the
instance (the class, and every other model of it, is untouched) by :func:`save_pretrained`, which
writes the model with :func:`lors_convert.checkpoint.save`: shared tensors once, factors per layer,
the source's config and tokenizer beside them. ``lors.load`` and ``lors.convert`` call it.
"""

from __future__ import annotations

import copy
import tempfile
import types
from pathlib import Path

import torch
from torch import nn

from ..errors import LorsError, LorsUsageError
from ..io.sources import SourceInfo
from .format import DEFAULT_SHARD_SIZE
from .writer import Origin, save


def enable_save_pretrained(model: nn.Module) -> None:
    """Make ``model.save_pretrained(DIR)`` write a LORS checkpoint (a model with that method only)."""
    if callable(getattr(type(model), "save_pretrained", None)):
        model.save_pretrained = types.MethodType(save_pretrained, model)


def save_pretrained(
    model: nn.Module,
    save_directory: str | Path,
    is_main_process: bool = True,
    state_dict: dict | None = None,
    push_to_hub: bool = False,
    max_shard_size: int | str = DEFAULT_SHARD_SIZE,
    **_ignored,
) -> None:
    """Write ``model`` into ``save_directory`` as a LORS checkpoint (replaced whole and atomically;
    files already there that the checkpoint does not write, such as a tokenizer, are kept).

    transformers' other options (``safe_serialization``, ``variant``, ...) do not apply: the
    checkpoint is always safetensors. ``state_dict`` may only be the model's own (Trainer passes it).
    """
    if not is_main_process:
        return
    if push_to_hub:
        raise LorsUsageError(
            "push_to_hub: save the LORS checkpoint with save_pretrained(DIR), then upload DIR"
        )
    if state_dict is not None:
        _check_own_state(model, state_dict)
    origin = getattr(model, "lors_origin", None) or Origin()
    if origin.files_dir is not None or not hasattr(getattr(model, "config", None), "save_pretrained"):
        save(model, Path(save_directory), force=True, max_shard_size=max_shard_size, keep_files=True)
        return
    with tempfile.TemporaryDirectory(prefix="lors-config-") as files:  # an in-memory conversion
        written = _write_config(model, Path(files))
        source = origin.source or SourceInfo(kind="hf", arch=type(model).__name__)
        source = copy.copy(source)
        source.files = written
        save(
            model,
            Path(save_directory),
            source=source,
            force=True,
            max_shard_size=max_shard_size,
            files_dir=Path(files),
            keep_files=True,
        )


def _write_config(model: nn.Module, directory: Path) -> list[str]:
    """The transformers config (and generation config) of ``model``, as ``save_pretrained`` writes them."""
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.save_pretrained(str(directory))
    generation = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", None)
    if generation is not None and callable(can_generate) and can_generate():
        generation.save_pretrained(str(directory))
    return sorted(f.name for f in directory.iterdir())


def _check_own_state(model: nn.Module, state_dict: dict) -> None:
    """A state dict handed to ``save_pretrained`` must hold the model's own tensors: a LORS
    checkpoint is written from the LORS layers, never from a dense state."""
    own = model.state_dict()
    same = state_dict.keys() == own.keys() and all(
        isinstance(t, torch.Tensor) and t.shape == own[k].shape and torch.equal(t, own[k])
        for k, t in state_dict.items()
    )
    if not same:
        raise LorsError(
            "save_pretrained(state_dict=...) of a LORS model takes only the model's own state: "
            "merge it first (lors.merge) to save other, dense weights"
        )


__all__ = ["enable_save_pretrained", "save_pretrained"]
