"""What a heal run is asked to do: :class:`HealSettings`, checked once, recorded in the resumable state.

A run ends at whichever limit comes first: ``steps`` optimizer steps, ``tokens`` tokens trained on,
``minutes`` of wall time (limits left at 0 are off; at least one must be set). The learning rate
warms up linearly over ``warmup`` steps and then follows a cosine to a tenth of ``lr`` over the
run's progress, the largest of the fractions of each limit used.

``local_share`` of the run (by that same progress) is the block-local phase: every stacked block is
fed the source's inputs to that block and trained to reproduce the source block's output; the rest
is the global phase, the student's output matched to the source's (``loss``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..errors import LorsUsageError
from ..options import LOSSES, MATCHES

PRECISIONS = ("auto", "fp32", "bf16")
LR_KL = 1e-4  # next-token KL of a causal LM (docs/healing.md, "Learning rate")
LR_OUTPUT = 1e-3  # output MSE of encoders and other models (docs/calibration.md, MiniLM)


@dataclass(frozen=True)
class HealSettings:
    steps: int = 300
    tokens: int = 0  # stop after this many tokens trained on (0: no token limit)
    minutes: float = 0.0  # stop after this much wall time (0: no time limit)
    lr: float | None = None  # peak learning rate [LR_KL for the kl loss, else LR_OUTPUT]
    warmup: int | None = None  # steps of linear warm-up [steps/20, at least 1; 10 under a token/time limit]
    weight_decay: float = 0.0
    loss: str | None = None  # the global phase's: mse, cosine, pooled_cosine (outputs), kl (logits) [mse]
    trainable: str = "lors"  # lors (shared parts, private factors, their biases) or all
    match: str = "output"  # output, or layers (also every stacked block's output)
    synthetic: float | None = None  # share of steps on bigram-chain inputs [0.75 for padded token data]
    local_share: float = 0.0  # share of the run in the block-local phase
    # fp32, bf16 (autocast; fp32 master weights and optimizer), or auto: bf16 where bf16_pays
    precision: str = "auto"
    checkpointing: bool = False  # recompute each block's activations in the backward pass
    seed: int = 0
    eval_every: int = 0  # held-out evaluations every N steps (0: only at the start and the end)
    eval_seconds: float = 0.0  # ... or every this many seconds of training (0: off)
    save_every: int = 50
    device: str | None = None  # where to train (default: where the student is)
    # the teacher's results of a batch kept after its first step (heal/objective.py, TeacherCache)
    cache_teacher: bool = True
    restart: bool = False  # discard a heal state left by other settings instead of refusing it

    def check(self) -> HealSettings:
        """``self`` if every value is usable, else a one-line :class:`LorsUsageError`."""
        if self.loss is not None and self.loss not in LOSSES:
            raise LorsUsageError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.match not in MATCHES:
            raise LorsUsageError(f"match must be one of {MATCHES}, got {self.match!r}")
        if self.trainable not in ("lors", "all"):
            raise LorsUsageError(f"trainable must be 'lors' or 'all', got {self.trainable!r}")
        if self.precision not in PRECISIONS:
            raise LorsUsageError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.steps < 0 or self.tokens < 0 or self.minutes < 0 or (self.lr is not None and self.lr <= 0):
            raise LorsUsageError("steps, tokens and minutes must be >= 0 and lr > 0")
        if self.synthetic is not None and not 0.0 <= self.synthetic <= 1.0:
            raise LorsUsageError(f"synthetic must be a share of the steps in [0, 1], got {self.synthetic!r}")
        if not 0.0 <= self.local_share <= 1.0:
            raise LorsUsageError(f"local_share must be in [0, 1], got {self.local_share!r}")
        return self

    def warmup_steps(self) -> int:
        if self.warmup is not None:
            return max(1, self.warmup)
        return max(1, self.steps // 20) if not (self.tokens or self.minutes) else 10

    def recorded(self) -> dict:
        """The settings a resumed run must share with the run that left the state (not the ones that
        only say where or how often: device, saving, evaluation cadence, restart)."""
        skip = {"device", "save_every", "restart", "eval_every", "eval_seconds", "cache_teacher", "minutes"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


def bf16_pays(device: str | None) -> bool:
    """Whether bf16 autocast is the faster choice on ``device``: a CUDA GPU with bf16, or a CPU with
    AMX or AVX512-BF16 (measured on SmolLM2: 2.6x the fp32 tokens/s with AVX512-BF16, docs/healing.md)."""
    import torch

    if device is not None and str(device).startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()  # Linux only; elsewhere fp32
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


SETTING_NAMES = tuple(f.name for f in fields(HealSettings))

__all__ = ["HealSettings", "PRECISIONS", "SETTING_NAMES", "LR_KL", "LR_OUTPUT"]
