"""Healing: distill a converted (LORS) model towards its source model on calibration inputs.

The student is trained to reproduce the teacher's output (the last hidden state of Hugging Face
models, else the first output tensor): token-level MSE relative to the teacher's energy
(``loss="mse"``), per-token cosine (``"cosine"``) or the cosine of mean-pooled embeddings
(``"pooled_cosine"``); padding is masked out when batches carry an ``attention_mask``. By default
only the LORS modules' parameters train (shared parts, private factors and those layers' biases,
``trainable="lors"``);
``trainable="all"`` trains everything. Adam with a short warm-up and cosine decay. For token
inputs, 3 steps in 4 by default (``synthetic``) run on inputs drawn from a bigram chain over the
calibration tokens (:mod:`lors_convert.heal.synthetic`), which generalizes to text of other kinds.

Resumable: with ``checkpoint_path`` the trainable tensors, the optimizer state, the step and the
loss history are saved every ``save_every`` steps, at the end, and on interruption (written to a
temporary file, then atomically renamed), and a later call with the same path continues from there.
The state records the call's settings (steps, lr, loss, trainable, match, synthetic share, seed,
warm-up, weight decay, and a digest of the data): a state left by other settings is refused with a
message saying how to start afresh (or discarded with ``restart=True``), never resumed silently.

The CLI's ``lors heal CKPT --data DATA`` wraps :func:`heal`::

    history = heal(lors_model, teacher, batches, steps=300, lr=1e-3,
                   checkpoint_path="heal.state.pt", progress=lambda step, steps, loss: ...)
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..calibrate.batches import Batch, batch_mask, finite, mean_pool, primary_output, run_model, to_device
from ..discover.stacks import find_stacks
from ..errors import LorsError, LorsUsageError, about, short
from ..layers import LorsModule
from ..options import LOSSES, MATCHES
from .synthetic import BigramChain, is_token_batch

STATE_VERSION = 2  # 2: the state records the settings it was made with ("config")
SYNTHETIC_DEFAULT = 0.75  # share of synthetic steps for token data (docs/calibration.md has the measurements)


@dataclass
class HealResult:
    history: list[dict] = field(default_factory=list)  # {"step": s, "loss": l} per step
    steps: int = 0  # steps done in total (including resumed ones)
    resumed_from: int = 0  # step the run resumed at (0: fresh)
    synthetic: float = 0.0  # share of steps on synthetic inputs that was used
    evaluations: list[dict] = field(default_factory=list)  # {"step": s, "score": held-out score}
    best_step: int | None = None  # the step whose state the student ends in (when evaluated)

    def to_dict(self) -> dict:
        return asdict(self)


def lors_parameter_names(model: nn.Module) -> set[str]:
    """Names (as ``named_parameters`` gives them) of every parameter that lives in a LORS module."""
    ids = {id(p) for m in model.modules() if isinstance(m, LorsModule) for p in m.parameters()}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def stack_members(model: nn.Module) -> list[str]:
    """Paths of every member of every stack of ``model`` (the blocks whose outputs ``match="layers"`` taps)."""
    return [m for stack in find_stacks(model) for m in stack.members]


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


def distill_loss(
    student_out: torch.Tensor, teacher_out: torch.Tensor, mask: torch.Tensor | None, kind: str = "mse"
) -> torch.Tensor:
    """Mean loss of a batch; ``mask`` (B, T) selects real tokens of (B, T, H) outputs. ``kl``: the
    outputs are logits, the loss ``KL(teacher || student)`` of their distributions per token."""
    s, t = student_out.float(), teacher_out.float()
    use_mask = mask is not None and s.dim() == 3 and tuple(s.shape[:2]) == tuple(mask.shape)
    if kind == "kl":
        lp_s, lp_t = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)  # (B, T, V)
        kl = (lp_t.exp() * (lp_t - lp_s)).sum(-1)  # (B, T)
        if use_mask:
            m = mask.to(kl.dtype)
            return (kl * m).sum() / m.sum().clamp_min(1.0)
        return kl.mean()
    if kind == "pooled_cosine":
        if use_mask:
            s, t = mean_pool(s, mask), mean_pool(t, mask)
        else:
            s, t = s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1)
        return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()
    if kind == "cosine":
        cos = F.cosine_similarity(s, t, dim=-1)  # per token (or per row)
        if use_mask:
            m = mask.to(cos.dtype)
            return ((1.0 - cos) * m).sum() / m.sum().clamp_min(1.0)
        return (1.0 - cos).mean()
    diff = (s - t) ** 2
    ref = t**2
    if use_mask:
        m = mask.to(diff.dtype).unsqueeze(-1)
        return (diff * m).sum() / (ref * m).sum().clamp_min(1e-12)
    return diff.sum() / ref.sum().clamp_min(1e-12)


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def _order(n: int, epoch: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def _save_state(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise LorsError(f"{path}: cannot write the heal state ({e.strerror or e})") from None


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


AFRESH = "to start afresh, delete it or pass --force (restart=True)"


def _read_state(path: Path, where: torch.device, config: dict, names: set[str], restart: bool) -> dict | None:
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
        version, recorded = state.get("version"), state.get("config")
    except Exception as e:  # noqa: BLE001 - truncated, not a torch file, not a dict
        if restart:
            return None
        why = short(e) or type(e).__name__
        raise LorsUsageError(f"{path}: cannot read the heal state ({why}); {AFRESH}") from None
    if version != STATE_VERSION or not isinstance(recorded, dict):
        why = f"it was written by another version of lors (state version {version!r})"
    elif recorded != config:
        changed = [k for k in sorted(set(config) | set(recorded)) if recorded.get(k) != config.get(k)]
        why = (
            "it was left by a different command ("
            + ", ".join(
                "data" if k == "data" else f"{k} {recorded.get(k)!r} -> {config.get(k)!r}" for k in changed
            )
            + ")"
        )
    elif not isinstance(state.get("trainable"), dict) or sorted(state["trainable"]) != sorted(names):
        why = "it was left for another model (different trainable parameters)"
    else:
        return state
    if restart:
        return None
    raise LorsUsageError(f"{path}: not resuming the heal state: {why}; {AFRESH}")


def heal(
    student: nn.Module,
    teacher: nn.Module,
    batches: Sequence[Batch],
    steps: int = 300,
    lr: float = 1e-3,
    loss: str = "mse",
    trainable: str = "lors",
    checkpoint_path: str | os.PathLike | None = None,
    save_every: int = 50,
    progress: Callable[[int, int, float], None] | None = None,
    device: str | torch.device | None = None,
    warmup: int | None = None,
    weight_decay: float = 0.0,
    seed: int = 0,
    cache_teacher: bool = True,
    match: str = "output",
    synthetic: float | None = None,
    evaluate: Callable[[], float] | None = None,
    eval_every: int = 0,
    restart: bool = False,
    data_name: str | None = None,
) -> HealResult:
    """Train ``student`` (in place) to match ``teacher`` on ``batches`` for ``steps`` optimizer steps.

    ``batches``: a sequence of model inputs (tensors or keyword dicts, e.g. from
    :func:`lors_convert.calibration.load_calibration`), cycled in a seeded order. ``device``: where to
    train (default: the student's device; the teacher is moved there). ``progress(step, steps,
    loss)`` is called after every step. Dropout is off (both models in eval mode) so the target is
    deterministic. ``match="layers"`` adds the output of every stacked block (the members of the
    teacher's stacks, hooked in both models) to the final output: the loss is their mean. Returns
    the loss history; the student's train/eval mode and ``requires_grad`` flags are restored.
    ``synthetic``: the share of steps that train on a synthetic batch instead (token batches only:
    the step's calibration batch with its tokens redrawn from a bigram chain over all calibration
    tokens, :mod:`lors_convert.heal.synthetic`); a few hundred sentences are otherwise learnt by heart.
    ``None``: :data:`SYNTHETIC_DEFAULT` when every batch is a token batch, else 0.
    ``restart``: a state at ``checkpoint_path`` left by other settings (or unreadable) is discarded
    instead of refused; a state of the same settings is always resumed. ``data_name`` (the data's
    file) prefixes errors about inputs the models cannot run on.
    ``evaluate()``: a held-out score of the student (higher is better), taken before the first step,
    every ``eval_every`` steps and after the last; the student ends in its best-scoring state (which
    may be the one it started in), recorded in ``HealResult.evaluations`` and ``best_step``.
    """
    if loss not in LOSSES:
        raise LorsUsageError(f"loss must be one of {LOSSES}, got {loss!r}")
    if match not in MATCHES:
        raise LorsUsageError(f"match must be one of {MATCHES}, got {match!r}")
    if trainable not in ("lors", "all"):
        raise LorsUsageError(f"trainable must be 'lors' or 'all', got {trainable!r}")
    if steps < 0 or lr <= 0:
        raise LorsUsageError("steps must be >= 0 and lr > 0")
    batches = list(batches)
    if not batches:
        raise LorsUsageError("healing needs at least one batch of inputs")
    if synthetic is None:
        synthetic = SYNTHETIC_DEFAULT if all(is_token_batch(b) for b in batches) else 0.0
    if not 0.0 <= synthetic <= 1.0:
        raise LorsUsageError(f"synthetic must be a share of the steps in [0, 1], got {synthetic!r}")
    chain = BigramChain.fit(batches) if synthetic > 0 else None
    if device is not None:
        student.to(device)
    where = next(student.parameters()).device
    if next(teacher.parameters(), torch.empty(0, device=where)).device != where:
        teacher.to(where)
    names = (
        lors_parameter_names(student) if trainable == "lors" else {n for n, _ in student.named_parameters()}
    )
    if not names:
        raise LorsUsageError(
            "the model has no LORS parameters to heal (convert it first, or trainable='all')"
        )
    params = dict(student.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    for n, p in params.items():
        p.requires_grad_(n in names)
    train_params = [params[n] for n in sorted(names)]
    optimizer = torch.optim.Adam(train_params, lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 20) if warmup is None else max(1, warmup)

    result = HealResult(synthetic=synthetic)
    start = 0
    path = Path(checkpoint_path) if checkpoint_path is not None else None
    config = {
        "steps": steps,
        "lr": lr,
        "loss": loss,
        "trainable": trainable,
        "match": match,
        "seed": seed,
        "synthetic": synthetic,
        "warmup": warmup,
        "weight_decay": weight_decay,
        "data": data_digest(batches) if path is not None else None,
    }
    state = _read_state(path, where, config, names, restart) if path is not None else None
    if state is not None:
        try:
            with torch.no_grad():
                for n, t in state["trainable"].items():
                    params[n].copy_(t)
            optimizer.load_state_dict(state["optimizer"])
            start = int(state["step"])
            result.history = list(state["history"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise LorsUsageError(f"{path}: cannot resume the heal state ({short(e)}); {AFRESH}") from None
        result.resumed_from = start

    def snapshot(step: int) -> None:
        if path is None:
            return
        _save_state(
            path,
            {
                "version": STATE_VERSION,
                "step": step,
                "trainable": {n: params[n].detach().cpu().clone() for n in sorted(names)},
                "optimizer": optimizer.state_dict(),
                "history": result.history,
                "config": config,
            },
        )

    was_training = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    cache: dict[int, list[torch.Tensor]] = {}
    members = stack_members(teacher) if match == "layers" else []
    student_taps, teacher_taps = BlockTaps(student, members), BlockTaps(teacher, members)

    @torch.no_grad()
    def teacher_targets(batch: Batch) -> list[torch.Tensor]:
        final = finite(primary_output(run_model(teacher, batch)).detach())
        return teacher_taps.take() + [final]

    done = start
    best: dict = {}

    def check(step: int) -> None:
        """Score the student; remember its trainable state when it is the best so far."""
        if evaluate is None:
            return
        score = float(evaluate())
        result.evaluations.append({"step": step, "score": score})
        if not best or score > best["score"]:
            best.update(score=score, step=step, state={n: params[n].detach().clone() for n in names})

    try:
        if cache_teacher:  # every batch once, before the first step: inputs the models cannot take fail here
            with about(data_name):
                cache = {i: teacher_targets(to_device(b, where)) for i, b in enumerate(batches)}
        check(start)
        for step in range(start, steps):
            epoch, pos = divmod(step, len(batches))
            idx = _order(len(batches), epoch, seed)[pos]
            fake = chain is not None and random.Random(seed * 7_919 + step).random() < synthetic
            batch = to_device(chain.batch(batches[idx], seed, step) if fake else batches[idx], where)
            targets = cache[idx] if idx in cache and not fake else teacher_targets(batch)
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, steps, lr, warmup)
            final = primary_output(run_model(student, batch))
            outs = student_taps.take() + [final]
            if len(outs) != len(targets):  # zip would pair the wrong blocks
                raise LorsError(
                    f"heal: the student ran {len(outs) - 1} stacked blocks, the teacher {len(targets) - 1}"
                )
            mask = batch_mask(batch)
            value = sum(distill_loss(o, t, mask, loss) for o, t in zip(outs, targets, strict=False)) / len(
                targets
            )
            if not torch.isfinite(value):  # diverged: every later step and the output would be NaN
                raise LorsError(
                    f"heal: the loss became {float(value.detach())} at step {step + 1} (try a lower --lr)"
                )
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            result.history.append({"step": step + 1, "loss": float(value.detach())})
            done = step + 1
            if progress is not None:
                progress(step + 1, steps, float(value.detach()))
            if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
                snapshot(step + 1)
            if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
                check(step + 1)
        snapshot(done)
        if done > start or not result.evaluations:
            check(done)
        if best:
            with torch.no_grad():
                for n, t in best["state"].items():
                    params[n].copy_(t)
            result.best_step = best["step"]
    except BaseException:
        if done > start:
            snapshot(done)  # interrupted: keep every finished step (one in flight is redone on resume)
        raise
    finally:
        student_taps.remove()
        teacher_taps.remove()
        for n, p in params.items():
            p.requires_grad_(flags[n])
        student.train(was_training[0])
        teacher.train(was_training[1])
    result.steps = done
    return result


__all__ = [
    "heal",
    "HealResult",
    "SYNTHETIC_DEFAULT",
    "distill_loss",
    "lors_parameter_names",
    "stack_members",
    "LOSSES",
    "MATCHES",
]
