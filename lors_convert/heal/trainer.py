"""The parts of the heal loop: train a converted model (in place) towards its source, resumably, keeping its best state.

:func:`heal` runs :class:`~lors_convert.heal.settings.HealSettings`: steps over ``batches`` in a
seeded order (a pure function of the seed and the step), the block-local phase first, then the
global one (:mod:`lors_convert.heal.objective`), Adam on the trainable parameters (fp32 master
weights also under bf16 autocast), warm-up then cosine decay in each phase. ``evaluate()`` (a
held-out score, higher is better) is taken before the first step, on the evaluation cadence and
after the last; the student ends in its best-scoring state, which may be the one it started in, so
heal never returns a model that scores worse than its start.

With ``checkpoint_path`` the state (trainable tensors, optimizer, progress, best state) is saved every
``save_every`` steps, at the end and on interruption; a later call with the same path continues where
it stopped and ends as the uninterrupted run would (:mod:`lors_convert.heal.state`)::

    result = heal(student, teacher, batches, HealSettings(steps=300, loss="kl"), evaluate=score)
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..calibrate.batches import Batch, batch_mask, batch_size, positions, to_device
from ..errors import LorsUsageError
from ..layers import LorsModule
from .blocks import local_backward
from .objective import GlobalObjective, stack_members
from .settings import LR_KL, LR_OUTPUT, HealSettings, bf16_pays
from .synthetic import BigramChain, is_token_batch

SYNTHETIC_DEFAULT = 0.75  # share of synthetic steps for padded token data (docs/healing.md)


@dataclass
class HealResult:
    history: list[dict] = field(default_factory=list)  # {"step", "loss", "phase", "tokens"} per step
    steps: int = 0  # steps done in total (including resumed ones)
    resumed_from: int = 0  # step the run resumed at (0: fresh)
    synthetic: float = 0.0  # share of steps on synthetic inputs that was used
    evaluations: list[dict] = field(default_factory=list)  # {"step", "tokens", "seconds", "score"}
    best_step: int | None = None  # the step whose state the student ends in (when evaluated)
    tokens: int = 0  # tokens trained on (including resumed steps)
    seconds: float = 0.0  # wall time of the training (including resumed runs)
    local_steps: int = 0  # steps of the block-local phase

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class HealStatus:
    """What a progress display shows after each step."""

    step: int
    tokens: int
    seconds: float
    loss: float
    phase: str  # "local" or "global"
    fraction: float  # of the run done (the largest of its limits' fractions)
    heldout: float | None  # the latest held-out score


def lors_parameter_names(model: nn.Module) -> set[str]:
    """Names (as ``named_parameters`` gives them) of every parameter that lives in a LORS module."""
    ids = {id(p) for m in model.modules() if isinstance(m, LorsModule) for p in m.parameters()}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def batch_tokens(batch: Batch) -> int:
    """Tokens (real positions) in a batch: the mask's ones, else samples times positions."""
    mask = batch_mask(batch)
    return int(mask.sum()) if mask is not None else batch_size(batch) * positions(batch)


def lr_at(step_in_phase: int, phase_fraction: float, lr: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``lr`` to ``lr / 10`` over the phase."""
    if step_in_phase < warmup:
        return lr * (step_in_phase + 1) / warmup
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(max(phase_fraction, 0.0), 1.0))))


@dataclass
class Progress:
    """How far a run is (restored on resume), and the fraction of it done."""

    settings: HealSettings
    step: int = 0
    tokens: int = 0
    seconds: float = 0.0  # before this call (resumed runs)
    phase_start: int = 0  # step the current phase began at
    local: bool = True
    started: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return self.seconds + time.perf_counter() - self.started

    def fraction(self) -> float:
        s = self.settings
        parts = [self.step / s.steps if s.steps else 0.0, self.tokens / s.tokens if s.tokens else 0.0]
        if s.minutes:
            parts.append(self.elapsed() / (60.0 * s.minutes))
        return max(parts)

    def phase_fraction(self) -> float:
        share, f = self.settings.local_share, self.fraction()
        return f / share if self.local and share else (f - share) / max(1.0 - share, 1e-9)


def _order(n: int, epoch: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def resolve(settings: HealSettings | None, changes: dict, batches: list) -> HealSettings:
    unknown = set(changes) - {f.name for f in dataclasses.fields(HealSettings)}
    if unknown:
        raise TypeError(f"heal() got unexpected settings {sorted(unknown)}")
    s = dataclasses.replace(settings or HealSettings(), **changes).check()
    if not (s.steps or s.tokens or s.minutes):
        raise LorsUsageError("healing needs a limit: steps, tokens or minutes")
    if not batches:
        raise LorsUsageError("healing needs at least one batch of inputs")
    if s.loss is None:
        s = dataclasses.replace(s, loss="mse")
    if s.precision == "auto":
        s = dataclasses.replace(s, precision="bf16" if bf16_pays(s.device) else "fp32")
    if s.lr is None:
        s = dataclasses.replace(s, lr=LR_KL if s.loss == "kl" else LR_OUTPUT)
    if s.synthetic is None:
        share = SYNTHETIC_DEFAULT if all(is_token_batch(b) for b in batches) else 0.0
        s = dataclasses.replace(s, synthetic=share)
    return s


class Trainer:
    """The student's trainable parameters, their optimizer, the objectives and the best state."""

    def __init__(self, student, teacher, batches: list, s: HealSettings):
        self.student, self.teacher, self.batches, self.s = student, teacher, batches, s
        if s.device is not None:
            student.to(s.device)
        self.where = next(student.parameters()).device
        if next(teacher.parameters(), torch.empty(0, device=self.where)).device != self.where:
            teacher.to(self.where)
        everything = {n for n, _ in student.named_parameters()}
        self.names = lors_parameter_names(student) if s.trainable == "lors" else everything
        if not self.names:
            raise LorsUsageError(
                "the model has no LORS parameters to heal (convert it first, or trainable='all')"
            )
        self.params = dict(student.named_parameters())
        self.flags = {n: p.requires_grad for n, p in self.params.items()}
        for n, p in self.params.items():
            p.requires_grad_(n in self.names)
        self.optimizer = self.new_optimizer()
        self.chain = BigramChain.fit(batches) if s.synthetic else None
        self.members = stack_members(teacher)
        match = self.members if s.match == "layers" else []
        probe = to_device(batches[0], self.where)
        self.objective = GlobalObjective(student, teacher, s.loss, match, probe, s.precision == "bf16")
        self.best: dict = {}
        self.modes = (student.training, teacher.training)
        student.eval()
        teacher.eval()

    def new_optimizer(self) -> torch.optim.Optimizer:
        train = [self.params[n] for n in sorted(self.names)]
        return torch.optim.Adam(train, lr=self.s.lr, weight_decay=self.s.weight_decay)

    def batch(self, step: int) -> tuple[Batch, int | None]:
        """The step's batch (on the training device) and its cache key (None for a synthetic one)."""
        s, n = self.s, len(self.batches)
        epoch, pos = divmod(step, n)
        idx = _order(n, epoch, s.seed)[pos]
        fake = self.chain is not None and random.Random(s.seed * 7_919 + step).random() < s.synthetic
        chosen = self.chain.batch(self.batches[idx], s.seed, step) if fake else self.batches[idx]
        return to_device(chosen, self.where), (idx if s.cache_teacher and not fake else None)

    def step(self, step: int, lr: float, local: bool) -> tuple[float, int]:
        """One optimizer step; its loss and the tokens it trained on."""
        batch, key = self.batch(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        if local:
            value = local_backward(
                self.student, self.teacher, self.members, batch, self.s.precision == "bf16"
            )
        else:
            value = self.objective.backward(batch, key)
        self.optimizer.step()
        return value, batch_tokens(batch)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: self.params[n].detach().cpu().clone() for n in sorted(self.names)}

    def load_trainable(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, t in tensors.items():
                self.params[n].copy_(t)

    def remember(self, score: float, step: int) -> None:
        if not self.best or score > self.best["score"]:
            self.best = {"score": score, "step": step, "state": self.trainable_state()}

    def close(self) -> None:
        self.objective.close()
        for n, p in self.params.items():
            p.requires_grad_(self.flags[n])
        self.student.train(self.modes[0])
        self.teacher.train(self.modes[1])


__all__ = ["HealResult", "HealStatus", "Progress", "Trainer", "lr_at", "resolve", "batch_tokens"]
__all__ += ["lors_parameter_names", "SYNTHETIC_DEFAULT"]
