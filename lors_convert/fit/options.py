"""What a fit is asked for (:class:`FitOptions`) and what it gives back (:class:`Fit`)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..errors import LorsUsageError
from ..options import INITS, METHODS


@dataclass
class FitOptions:
    """How every parameter of a conversion is fitted."""

    init: str = "svd"  # "svd": fit the trained weights; "paper": the paper's from-scratch init
    method: str = "auto"  # SVD: "auto", "exact", "randomized"
    device: str | torch.device | None = None  # where the math runs
    calibration: object | None = None  # Grams (lors_convert.calibrate.grams.Calibration or a mapping)
    refine: int = 0  # alternating sweeps of the shared part
    budget: float | None = None  # a rank budget chose the ranks (and solved the shared parts)

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise LorsUsageError(f"init must be one of {INITS}, got {self.init!r}")
        if self.method not in METHODS:
            raise LorsUsageError(f"method must be auto, exact or randomized, got {self.method!r}")
        if self.refine < 0:
            raise LorsUsageError(f"refine must be >= 0, got {self.refine}")
        if self.weighted and self.init != "svd":
            raise LorsUsageError("calibration, refine and budget apply to init='svd' only")

    @property
    def weighted(self) -> bool:
        """Whether static parameters take the calibrated (weighted) fit."""
        return self.calibration is not None or self.refine > 0 or self.budget is not None


@dataclass
class Fit:
    """The factors of one planned parameter and what they cost in reconstruction error."""

    shared: torch.Tensor | None  # static (d, h); adaptive (out, dq+1); None: private-only
    factors: (
        list | Iterator
    )  # per layer: (B, A) static (None: a member kept dense); a list of (B, A, C) per layout entry adaptive
    relative_error: list[float] = field(default_factory=list)  # ||W_i - What_i||_F / ||W_i||_F
    retained_energy: list[float] = field(default_factory=list)  # of the residual
    weighted: tuple | None = None  # calibrated: (weighted errors, output energies, refine history)

    def settle(self) -> None:
        """Finish an iterated fit: ``factors`` may be an iterator (plain fits solve each chunk as the
        sink consumes it) whose errors fill in as it goes; drain what a sink left unread."""
        if isinstance(self.factors, Iterator):
            deque(self.factors, maxlen=0)
            self.factors = None

    def materialized(self) -> Fit:
        """The fit with ``factors`` as a list (consumes an iterator)."""
        if isinstance(self.factors, Iterator):
            self.factors = list(self.factors)
        return self
