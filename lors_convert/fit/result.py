"""What a fit gives back (:class:`Fit`): the shared part, the per-layer factors and their errors."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


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
