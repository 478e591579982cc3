"""Function-level fidelity: how close the converted model's outputs are to the source's on held-out data.

Take the reference outputs *before* converting (conversion is in place)::

    ref = reference_outputs(model, heldout_batches)
    lors_model, report = convert(model, ...)
    report.quality.update(fidelity(lors_model, ref))

For text encoders (keyword batches with an ``attention_mask`` and a ``(B, T, H)`` output) the
figure is the cosine between mean-pooled sentence embeddings (sentence-transformers pooling); for
any model the relative output error ``||y - y_ref|| / ||y_ref||`` per sample is reported too.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .batches import Batch, batch_mask, finite, mean_pool, model_device, primary_output, run_model, to_device


@dataclass
class Reference:
    """Source-model outputs on held-out batches (CPU float32)."""

    batches: list[Batch]
    outputs: list[torch.Tensor]
    masks: list[torch.Tensor | None]


@torch.no_grad()
def reference_outputs(model: nn.Module, batches: Iterable[Batch]) -> Reference:
    batches = list(batches)
    outputs, masks = [], []
    was_training = model.training
    model.eval()
    where = model_device(model)
    try:
        for b in batches:
            y = finite(primary_output(run_model(model, to_device(b, where))))
            outputs.append(y.detach().float().cpu())
            m = batch_mask(b)
            masks.append(m.cpu() if m is not None else None)
    finally:
        model.train(was_training)
    return Reference(batches, outputs, masks)


@torch.no_grad()
def fidelity(model: nn.Module, reference: Reference, prefix: str = "heldout") -> dict:
    """Compare ``model`` with the reference outputs; a flat dict for ``report.quality``.

    Keys: ``{prefix}_samples``, ``{prefix}_rel_error`` (mean over samples), and for text encoders
    ``{prefix}_cosine`` (mean) and ``{prefix}_cosine_min``.
    """
    if not reference.batches:
        return {}
    was_training = model.training
    model.eval()
    where = model_device(model)
    cosines, rel = [], []
    try:
        for b, y_ref, mask in zip(reference.batches, reference.outputs, reference.masks):
            y = primary_output(run_model(model, to_device(b, where))).detach().float().cpu()
            if mask is not None and y.dim() == 3 and tuple(y.shape[:2]) == tuple(mask.shape):
                e, e_ref = mean_pool(y, mask), mean_pool(y_ref, mask)
                cosines.append(torch.nn.functional.cosine_similarity(e, e_ref, dim=-1))
                m = mask.unsqueeze(-1).float()
                num = (((y - y_ref) * m) ** 2).flatten(1).sum(1)
                den = ((y_ref * m) ** 2).flatten(1).sum(1)
            else:
                yf, rf = y.reshape(y.shape[0], -1), y_ref.reshape(y_ref.shape[0], -1)
                num, den = ((yf - rf) ** 2).sum(1), (rf ** 2).sum(1)
            rel.append((num / den.clamp_min(1e-30)).sqrt())
    finally:
        model.train(was_training)
    rel_all = torch.cat(rel)
    result = {f"{prefix}_samples": int(rel_all.numel()), f"{prefix}_rel_error": float(rel_all.mean())}
    if cosines:
        cos = torch.cat(cosines)
        result[f"{prefix}_cosine"] = float(cos.mean())
        result[f"{prefix}_cosine_min"] = float(cos.min())
    for k, v in result.items():
        if isinstance(v, float) and not math.isfinite(v):
            result[k] = None
    return result


__all__ = ["Reference", "reference_outputs", "fidelity"]
