"""What one training step of each phase minimizes, and its backward pass.

- :class:`GlobalObjective`: the student's output matched to the teacher's on a batch. For a causal LM
  trained on ``kl``, both models run without their output head and the next-token KL is formed a few
  hundred positions at a time (:func:`~lors_convert.heal.losses.chunked_kl_backward`): a batch's
  logits never exist whole. Other outputs (hidden states, small logits) follow
  :func:`~lors_convert.heal.losses.distill_loss`, with ``match="layers"`` every stacked block's
  output added to the loss.
- :class:`TeacherCache`: what the teacher gives for a batch (its final hidden states for the KL, its
  outputs otherwise) kept by batch index, up to a byte limit, so that a run that passes over its
  data several times runs the teacher's body once per batch. For the KL it keeps hidden states, not
  logits: SmolLM2's 32k heal tokens are 75 MB of hidden states and 6 GB of logits; the teacher's
  output head (a fifth of its work per token) runs on every step.
- the block-local phase: :func:`lors_convert.heal.blocks.local_backward`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..calibrate.batches import Batch, batch_mask, finite, primary_output, run_model
from ..discover.stacks import find_stacks
from ..errors import LorsError
from ..io.memory import KeptResults
from .losses import chunked_kl_backward, distill_loss


def stack_members(model: nn.Module) -> list[str]:
    """Paths of every member of every stack of ``model`` (the blocks ``match="layers"`` taps)."""
    return [m for stack in find_stacks(model) for m in stack.members]


def autocast(device: torch.device, enabled: bool):
    return torch.autocast("cpu" if device.type == "cpu" else device.type, torch.bfloat16, enabled=enabled)


class BlockTaps:
    """Forward hooks that keep the latest output tensor of each named block, in order."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.names = list(names)
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [model.get_submodule(n).register_forward_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str):
        def hook(module, args, output):
            self.outputs[name] = primary_output(output)

        return hook

    def take(self) -> list[torch.Tensor]:
        outs = [self.outputs.pop(n) for n in self.names if n in self.outputs]
        self.outputs.clear()
        return outs

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def split_head(model: nn.Module, probe: Batch) -> tuple[nn.Module, nn.Module] | None:
    """``(body, head)`` of a causal LM whose logits are ``head(body(**batch).last_hidden_state)``,
    checked on ``probe`` (a model that scales or caps its logits is not split); else None."""
    body = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if body is None or body is model or head is None or not isinstance(probe, dict):
        return None
    small = {k: v[:1, :8] for k, v in probe.items()}
    with torch.no_grad():
        full = run_model(model, small).logits
        split = head(primary_output(run_model(body, small)))
    return (body, head) if torch.allclose(full, split, rtol=1e-4, atol=1e-4) else None


TEACHER_CACHE_BYTES = 1 << 30  # beyond this the teacher runs on every step of the batches not kept


class TeacherCache(KeptResults):
    """Teacher results by batch index, kept while they fit in ``limit`` bytes."""

    def __init__(self, limit: int = TEACHER_CACHE_BYTES):
        super().__init__(limit)


class GlobalObjective:
    """The global phase's loss on a batch, and its backward pass (see the module docstring)."""

    def __init__(self, student, teacher, loss: str, members: list[str], probe: Batch, bf16: bool):
        self.student, self.teacher, self.loss, self.bf16 = student, teacher, loss, bf16
        self.heads = None
        if loss == "kl" and not members:
            s, t = split_head(student, probe), split_head(teacher, probe)
            self.heads = (s, t) if s is not None and t is not None else None
        self.student_taps, self.teacher_taps = BlockTaps(student, members), BlockTaps(teacher, members)
        self.cache = TeacherCache()

    def close(self) -> None:
        self.student_taps.remove()
        self.teacher_taps.remove()

    @torch.no_grad()
    def targets(self, batch: Batch) -> list[torch.Tensor]:
        with autocast(_device(self.teacher), self.bf16):
            final = finite(primary_output(run_model(self.teacher, batch)).detach())
        return self.teacher_taps.take() + [final]  # the taps filled during the run

    def backward(self, batch: Batch, key: int | None = None) -> float:
        """Accumulate the gradient of the loss on ``batch``; its value. ``key``: the batch's index, for
        the cache of teacher outputs (None: not cached)."""
        if self.heads is not None:
            return self._kl_backward(batch, key)
        targets = self.cache.get(key, lambda: self.targets(batch))
        with autocast(_device(self.student), self.bf16):
            final = primary_output(run_model(self.student, batch))
        outs = self.student_taps.take() + [final]
        if len(outs) != len(targets):  # zip would pair the wrong blocks
            raise LorsError(
                f"heal: the student ran {len(outs) - 1} stacked blocks, the teacher {len(targets) - 1}"
            )
        mask = batch_mask(batch)
        value = sum(distill_loss(o, t, mask, self.loss) for o, t in zip(outs, targets, strict=True))
        value = value / len(targets)
        check_finite(value)
        value.backward()
        return float(value.detach())

    @torch.no_grad()
    def teacher_hidden(self, batch: Batch) -> list[torch.Tensor]:
        """The teacher's final hidden states on ``batch``: the input of its output head."""
        with autocast(_device(self.teacher), self.bf16):
            return [finite(primary_output(run_model(self.heads[1][0], batch)))]  # [(B, T, H)]

    def _kl_backward(self, batch: Batch, key: int | None) -> float:
        (s_body, s_head), (_, t_head) = self.heads
        (t_hidden,) = self.cache.get(key, lambda: self.teacher_hidden(batch))  # (B, T, H)
        with autocast(_device(self.student), self.bf16):
            s_hidden = primary_output(run_model(s_body, batch))  # (B, T, H)
        value = chunked_kl_backward(s_hidden, t_hidden, s_head, t_head, autocast=self.bf16)
        check_finite(torch.tensor(value))
        return value


def check_finite(value: torch.Tensor) -> None:
    if not torch.isfinite(value):  # diverged: every later step and the output would be NaN
        raise LorsError(f"heal: the loss became {float(value.detach())} (try a lower --lr)")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


__all__ = [
    "GlobalObjective",
    "TeacherCache",
    "TEACHER_CACHE_BYTES",
    "BlockTaps",
    "split_head",
    "stack_members",
    "autocast",
    "check_finite",
]
