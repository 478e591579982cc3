"""Running a model on calibration batches: what a batch is, where it runs, which output to compare.

A batch is a tensor (passed positionally) or a dict of tensors (keyword arguments, e.g.
``input_ids`` and ``attention_mask``); padding is the ``attention_mask``'s zeros. A model that
cannot run on a batch raises a one-line :class:`~lors_convert.errors.LorsError`.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

from ..errors import LorsError, short
from ..finite import all_finite

Batch = torch.Tensor | dict[str, torch.Tensor]


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def body_holding(model: nn.Module, modules: Iterable[nn.Module], batch: Batch) -> nn.Module:
    """The part of ``model`` a pass must run for ``modules`` to see their inputs: a Hugging Face
    model's ``base_model`` (the model without its task head) when it holds every one of them and
    takes every keyword of ``batch``, else ``model``. A pass that only reads the stacks' inputs then
    skips the head: a causal LM's logits, 2,048 x 49,152 floats for a SmolLM2 batch of 2,048 tokens,
    and a fifth of its work per token."""
    body = getattr(model, "base_model", None)
    if not isinstance(body, nn.Module) or body is model:
        return model
    if isinstance(batch, Mapping):
        takes = inspect.signature(body.forward).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in takes.values()) and not set(batch) <= set(takes):
            return model  # e.g. labels, which only the task head reads
    inside = {id(m) for m in body.modules()}
    return body if all(id(m) in inside for m in modules) else model


def run_model(model: nn.Module, batch: Batch):
    """Call ``model`` on a batch: a tensor positionally, a dict as keyword arguments.

    Inputs the model cannot take (wrong shapes, token ids beyond its vocabulary, unknown keywords)
    are a :class:`LorsError` on one line, not a traceback from deep inside the model.
    """
    try:
        if isinstance(batch, Mapping):
            return model(**batch)
        if isinstance(batch, (tuple, list)):
            return model(*batch)
        return model(batch)
    except (RuntimeError, IndexError, TypeError, ValueError) as e:
        raise LorsError(f"the model cannot run on these inputs ({type(e).__name__}: {short(e)})") from None


@contextlib.contextmanager
def no_cache(model: nn.Module) -> Iterator[None]:
    """A model that keeps no key/value cache while inside (a run whose blocks are called more than
    once, or in pieces, would keep one per call)."""
    config = getattr(model, "config", None)
    cache = getattr(config, "use_cache", None)
    if cache:
        config.use_cache = False
    try:
        yield
    finally:
        if cache:
            config.use_cache = cache


def batch_mask(batch: Batch) -> torch.Tensor | None:
    if isinstance(batch, Mapping) and isinstance(batch.get("attention_mask"), torch.Tensor):
        return batch["attention_mask"].bool()
    return None


def positions(batch: Batch) -> int:
    """Output positions per sample, roughly: tokens of a ``(B, T)`` id batch, pixels of a
    ``(B, C, H, W)`` image batch, else 1."""
    x = batch.get("input_ids") if isinstance(batch, Mapping) else batch
    if not isinstance(x, torch.Tensor):
        return 1
    if x.dim() == 2 and not x.is_floating_point():
        return int(x.shape[1])
    if x.dim() == 4:
        return int(x.shape[2] * x.shape[3])
    return 1


def split_batch(batch: Batch, rows: int) -> list[Batch]:
    """``batch`` as consecutive chunks of at most ``rows`` samples (every tensor with the batch's
    leading size is split; others are passed to every chunk)."""
    n = batch_size(batch)
    if rows >= n:
        return [batch]
    if isinstance(batch, torch.Tensor):
        return list(batch.split(rows))
    chunks = []
    for start in range(0, n, rows):
        chunks.append(
            {
                k: (
                    v[start : start + rows]
                    if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n
                    else v
                )
                for k, v in batch.items()
            }
        )
    return chunks


def batch_size(batch: Batch) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.dim():
            return int(v.shape[0])
    return 1


def token_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """An activation ``(..., n)`` as rows ``(positions, n)``; with a ``(B, T)`` mask matching its
    leading dimensions, the real tokens only."""
    n = x.shape[-1]
    if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.to(x.device)].reshape(-1, n)
    return x.reshape(-1, n)


def primary_output(out) -> torch.Tensor:
    """The tensor to compare: ``last_hidden_state`` of HF outputs, else the first tensor."""
    if isinstance(out, torch.Tensor):
        return out
    hidden = getattr(out, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    if isinstance(out, Mapping):
        if isinstance(out.get("last_hidden_state"), torch.Tensor):
            return out["last_hidden_state"]
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, torch.Tensor):
                return o
    raise TypeError(f"cannot find a tensor in the model output ({type(out).__name__})")


def finite(y: torch.Tensor) -> torch.Tensor:
    """``y``, refused when a model output is NaN or Inf (inputs that overflow the model)."""
    if not all_finite(y):
        raise LorsError("the model's output on these inputs is not finite (NaN or Inf): they overflow it")
    return y


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average over the real tokens: ``(B, T, H), (B, T) -> (B, H)``."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
