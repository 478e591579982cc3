"""The heal loop: train a converted model (in place) towards its source, resumably, keeping its best state.

:func:`heal` runs :class:`~lors_convert.heal.settings.HealSettings` with a
:class:`~lors_convert.heal.trainer.Trainer`: the block-local phase first, then the global one, until
the first limit (steps, tokens, minutes). ``evaluate()`` (a held-out score, higher is better) is
taken before the first step, on the evaluation cadence and after the last; the student ends in its
best-scoring state, which may be the one it started in: heal never returns a model that scores
worse than its start.

With ``checkpoint_path`` the state (trainable tensors, optimizer, progress, evaluations, best state)
is saved every ``save_every`` steps, at the end and on interruption; a later call with the same
settings and path continues where it stopped and ends as the uninterrupted run would
(:mod:`lors_convert.heal.state`)::

    result = heal(student, teacher, batches, HealSettings(steps=300, loss="kl"), evaluate=score)
    result = heal(student, teacher, batches, steps=300, loss="kl")  # the same, settings as keywords
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from torch import nn

from ..calibrate.batches import Batch, to_device
from ..errors import LorsUsageError, about, short
from .settings import HealSettings
from .state import AFRESH, data_digest, read_state, save_state
from .trainer import HealResult, HealStatus, Progress, Trainer, lr_at, resolve


class _Run:
    """One call of :func:`heal`: the trainer, the progress and the result, saved and restored together."""

    def __init__(self, trainer: Trainer, path: Path | None, config: dict):
        self.t, self.path, self.config = trainer, path, config
        self.p = Progress(trainer.s)
        self.result = HealResult(synthetic=trainer.s.synthetic or 0.0)
        self.last_eval = (0, time.perf_counter())

    def restore(self, state: dict) -> None:
        t, p, r = self.t, self.p, self.result
        try:
            t.load_trainable(state["trainable"])
            p.local = bool(state["local"])
            if not p.local:
                t.optimizer = t.new_optimizer()
            t.optimizer.load_state_dict(state["optimizer"])
            p.step, p.tokens, p.seconds = int(state["step"]), int(state["tokens"]), float(state["seconds"])
            p.phase_start = int(state["phase_start"])
            r.history, r.evaluations = list(state["history"]), list(state["evaluations"])
            t.best = dict(state["best"]) if state.get("best") else {}
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise LorsUsageError(
                f"{self.path}: cannot resume the heal state ({short(e)}); {AFRESH}"
            ) from None
        r.resumed_from = p.step

    def save(self) -> None:
        if self.path is None:
            return
        p, t = self.p, self.t
        save_state(
            self.path,
            {
                "config": self.config,
                "trainable": t.trainable_state(),
                "optimizer": t.optimizer.state_dict(),
                "step": p.step,
                "tokens": p.tokens,
                "seconds": p.elapsed(),
                "local": p.local,
                "phase_start": p.phase_start,
                "history": self.result.history,
                "evaluations": self.result.evaluations,
                "best": t.best,
            },
        )

    def check(self, evaluate: Callable[[], float] | None) -> None:
        """Score the student; remember its trainable state when it is the best so far."""
        self.last_eval = (self.p.step, time.perf_counter())
        if evaluate is None:
            return
        value, p = evaluate(), self.p
        extra = {k: v for k, v in value.items() if k != "score"} if isinstance(value, Mapping) else {}
        score = float(value["score"] if isinstance(value, Mapping) else value)
        self.result.evaluations.append(
            {"step": p.step, "tokens": p.tokens, "seconds": round(p.elapsed(), 1), "score": score, **extra}
        )
        self.t.remember(score, p.step)

    def due(self) -> bool:
        s, when = self.t.s, self.last_eval[1]
        by_steps = s.eval_every and self.p.step % s.eval_every == 0
        return bool(by_steps or (s.eval_seconds and time.perf_counter() - when >= s.eval_seconds))

    def one_step(self) -> float:
        p, s = self.p, self.t.s
        if p.local and p.fraction() >= s.local_share:  # the block-local phase is over
            p.local, p.phase_start = False, p.step
            self.t.optimizer = self.t.new_optimizer()
        lr = lr_at(p.step - p.phase_start, p.phase_fraction(), s.lr, s.warmup_steps())
        value, tokens = self.t.step(p.step, lr, p.local)
        p.step, p.tokens = p.step + 1, p.tokens + tokens
        self.result.history.append(
            {"step": p.step, "loss": value, "phase": "local" if p.local else "global", "tokens": p.tokens}
        )
        return value

    def loop(self, evaluate, progress, monitor) -> None:
        s, p = self.t.s, self.p
        while p.fraction() < 1.0:
            value = self.one_step()
            if progress is not None:
                progress(p.step, s.steps, value)
            if monitor is not None:
                latest = self.result.evaluations[-1]["score"] if self.result.evaluations else None
                phase = "local" if p.local else "global"
                monitor(HealStatus(p.step, p.tokens, p.elapsed(), value, phase, p.fraction(), latest))
            if s.save_every and p.step % s.save_every == 0 and p.fraction() < 1.0:
                self.save()
            if self.due() and p.fraction() < 1.0:
                self.check(evaluate)

    def finish(self, evaluate) -> HealResult:
        t, p, r = self.t, self.p, self.result
        if p.step > r.resumed_from or not r.evaluations:
            self.check(evaluate)
        self.save()
        if t.best:
            t.load_trainable(t.best["state"])
            r.best_step = t.best["step"]
        r.steps, r.tokens, r.seconds = p.step, p.tokens, p.elapsed()
        r.local_steps = sum(1 for h in r.history if h.get("phase") == "local")
        return r


def heal(
    student: nn.Module,
    teacher: nn.Module,
    batches: Sequence[Batch],
    settings: HealSettings | None = None,
    *,
    checkpoint_path: str | os.PathLike | None = None,
    evaluate: Callable[[], float] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    monitor: Callable[[HealStatus], None] | None = None,
    data_name: str | None = None,
    **changes,
) -> HealResult:
    """Train ``student`` (in place) to match ``teacher`` on ``batches`` (tensors or keyword dicts).

    ``settings`` with ``changes`` (any :class:`HealSettings` field as a keyword) say what to run.
    ``progress(step, steps, loss)`` and ``monitor(HealStatus)`` are called after every step.
    ``data_name`` (the data's file) prefixes errors about inputs the models cannot run on. Dropout is
    off (both models in eval mode); the student's mode and ``requires_grad`` flags are restored.
    """
    batches = list(batches)
    s = resolve(settings, changes, batches)
    trainer = Trainer(student, teacher, batches, s)
    path = Path(checkpoint_path) if checkpoint_path is not None else None
    config = {**s.recorded(), "data": data_digest(batches) if path is not None else None}
    run = _Run(trainer, path, config)
    try:
        state = read_state(path, trainer.where, config, trainer.names, s.restart) if path else None
        if state is not None:
            run.restore(state)
        with about(data_name):
            if not run.result.evaluations:
                to_device(batches[0], trainer.where)
                run.check(evaluate)
            run.loop(evaluate, progress, monitor)
        return run.finish(evaluate)
    except BaseException:
        if run.p.step > run.result.resumed_from:
            run.save()  # interrupted: keep every finished step (one in flight is redone on resume)
        raise
    finally:
        trainer.close()


__all__ = ["heal", "HealSettings", "HealResult", "HealStatus"]
