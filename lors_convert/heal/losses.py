"""Distillation losses: a student output against its teacher's, and next-token KL chunked over positions.

:func:`distill_loss` compares two outputs: token-level MSE relative to the teacher's energy
(``mse``), per-token cosine (``cosine``), the cosine of mean-pooled embeddings (``pooled_cosine``),
or ``KL(teacher || student)`` of logits (``kl``); padding is masked out.

:func:`chunked_kl_backward` is the causal-LM global loss without a batch's logits in memory: from the
final hidden states of both models it forms ``rows`` positions' logits at a time (``(rows, V)``),
adds their KL's gradient into the student's hidden states, and runs the student's backward once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..calibrate.batches import mean_pool

KL_ROWS = 512  # positions whose logits are formed together (SmolLM2: 512 x 49152 floats, 100 MB)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None or tuple(values.shape) != tuple(mask.shape):
        return values.mean()
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp_min(1.0)


def kl_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """``KL(teacher || student)`` of each position's distribution: ``(..., V) -> (...)``, float32."""
    lp_s = F.log_softmax(student_logits.float(), dim=-1)
    lp_t = F.log_softmax(teacher_logits.float(), dim=-1)
    return (lp_t.exp() * (lp_t - lp_s)).sum(-1)


def distill_loss(
    student_out: torch.Tensor, teacher_out: torch.Tensor, mask: torch.Tensor | None, kind: str = "mse"
) -> torch.Tensor:
    """Mean loss of a batch; ``mask`` (B, T) selects real tokens of (B, T, H) outputs."""
    s, t = student_out.float(), teacher_out.float()
    use_mask = mask is not None and s.dim() == 3 and tuple(s.shape[:2]) == tuple(mask.shape)
    mask = mask if use_mask else None
    if kind == "kl":
        return _masked_mean(kl_per_token(s, t), mask)  # (B, T) -> ()
    if kind == "pooled_cosine":
        if mask is not None:
            s, t = mean_pool(s, mask), mean_pool(t, mask)  # (B, H)
        else:
            s, t = s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1)
        return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()
    if kind == "cosine":
        return _masked_mean(1.0 - F.cosine_similarity(s, t, dim=-1), mask)
    diff, ref = (s - t) ** 2, t**2  # (B, T, H)
    if mask is not None:
        m = mask.to(diff.dtype).unsqueeze(-1)
        return (diff * m).sum() / (ref * m).sum().clamp_min(1e-12)
    return diff.sum() / ref.sum().clamp_min(1e-12)


def chunked_kl_backward(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: nn.Module,
    teacher_head: nn.Module,
    rows: int = KL_ROWS,
    autocast: bool = False,
) -> float:
    """Mean next-token ``KL(teacher || student)`` over every position of ``(B, T, H)`` hidden states
    (the inputs of the output heads), with its gradient propagated into the student's graph. Logits
    exist ``rows`` positions at a time. Returns the loss value."""
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])  # (N, H)
    ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
    leaf = hs.detach().requires_grad_(True)
    n, total = hs.shape[0], 0.0
    for start in range(0, n, rows):
        with torch.autocast("cpu" if hs.device.type == "cpu" else hs.device.type, torch.bfloat16, autocast):
            logits_s = student_head(leaf[start : start + rows])  # (c, V)
            with torch.no_grad():
                logits_t = teacher_head(ht[start : start + rows])  # (c, V)
        part = kl_per_token(logits_s, logits_t).sum() / n
        part.backward()
        total += float(part.detach())
        del logits_s, logits_t, part
    hs.backward(leaf.grad)
    return total


__all__ = ["distill_loss", "kl_per_token", "chunked_kl_backward", "KL_ROWS"]
