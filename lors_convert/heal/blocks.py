"""The block-local phase: each stacked block of the student fed the source's inputs to that block.

The teacher runs once on a batch with a hook on every stacked block that records the block's call
(positional and keyword arguments: hidden states, attention masks, rotary embeddings) and its
output. Then, one block at a time, the student's block of the same path runs on the recorded call
and its output is compared with the teacher's (MSE relative to the teacher output's energy); the
backward pass of that block runs at once, so one block's activations are in memory, and the
gradients of every block add up before one optimizer step (shared parameters get every block's).

    step_loss = local_backward(student, teacher, members, batch, autocast=False)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..calibrate.batches import Batch, primary_output, run_model
from .losses import distill_loss


class CallRecorder:
    """Forward hooks that record each named block's inputs and output, in call order."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.calls: list[tuple[str, tuple, dict, torch.Tensor]] = []
        self.handles = [
            model.get_submodule(n).register_forward_hook(self._hook(n), with_kwargs=True) for n in names
        ]

    def _hook(self, name: str):
        def hook(module, args, kwargs, output):
            self.calls.append((name, args, dict(kwargs), primary_output(output).detach()))

        return hook

    def take(self) -> list[tuple[str, tuple, dict, torch.Tensor]]:
        calls, self.calls = self.calls, []
        return calls

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


@contextlib.contextmanager
def recording(model: nn.Module, names: list[str]) -> Iterator[CallRecorder]:
    recorder = CallRecorder(model, names)
    try:
        yield recorder
    finally:
        recorder.remove()


def _detached(x):
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, tuple):
        return tuple(_detached(v) for v in x)
    return x


@torch.no_grad()
def teacher_calls(teacher: nn.Module, members: list[str], batch: Batch) -> list[tuple]:
    """The teacher's recorded call of every stacked block on ``batch`` (see the module docstring)."""
    with recording(teacher, members) as rec:
        run_model(teacher, batch)
        return rec.take()


def block_error(block: nn.Module, call: tuple, autocast: bool) -> torch.Tensor:
    """The relative MSE of ``block`` on a recorded teacher call, with a graph for the backward pass."""
    _, args, kwargs, target = call
    args = tuple(_detached(a) for a in args)
    kwargs = {k: _detached(v) for k, v in kwargs.items()}
    device = target.device.type
    with torch.autocast("cpu" if device == "cpu" else device, torch.bfloat16, enabled=autocast):
        out = primary_output(block(*args, **kwargs))  # (B, T, H)
    return distill_loss(out, target, None, "mse")


def local_backward(
    student: nn.Module, teacher: nn.Module, members: list[str], batch: Batch, autocast: bool = False
) -> float:
    """Accumulate the gradient of the mean block error over every stacked block; its value."""
    calls = teacher_calls(teacher, members, batch)
    total = 0.0
    for call in calls:
        loss = block_error(student.get_submodule(call[0]), call, autocast) / len(calls)
        loss.backward()
        total += float(loss.detach())
    return total


@torch.no_grad()
def block_errors(student: nn.Module, teacher: nn.Module, members: list[str], batch: Batch) -> list[float]:
    """Each block's relative output error on the teacher's inputs to it (held-out measurement)."""
    return [
        float(block_error(student.get_submodule(c[0]), c, False))
        for c in teacher_calls(teacher, members, batch)
    ]


__all__ = ["CallRecorder", "teacher_calls", "block_error", "local_backward", "block_errors"]
