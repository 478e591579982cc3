"""Healing: distill a converted model towards its dense source (:mod:`.distill`), partly on synthetic
token inputs drawn from a bigram chain over the data (:mod:`.synthetic`)."""

from __future__ import annotations

from .distill import HealResult, distill_loss, heal, stack_members

__all__ = ["heal", "HealResult", "distill_loss", "stack_members"]
