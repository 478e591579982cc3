"""Healing: distill a converted model towards its dense source.

:func:`heal_checkpoint` is ``lors heal``: a checkpoint in, a healed checkpoint out, with data chosen
(text the source writes, for causal LMs), fidelity before and after, and a report. Below it:
:func:`heal` (the loop, :mod:`.train`) on :class:`HealSettings` (:mod:`.settings`), the objectives
of its two phases (:mod:`.objective`, :mod:`.blocks`, :mod:`.losses`), token-packed windows
(:mod:`lors_convert.calibrate.packing`), the resumable state (:mod:`.state`) and bigram-chain synthetic inputs
(:mod:`.synthetic`).
"""

from __future__ import annotations

from .losses import distill_loss
from .objective import stack_members
from .settings import HealSettings
from .train import HealResult, HealStatus, heal

__all__ = ["heal", "HealSettings", "HealResult", "HealStatus", "distill_loss", "stack_members"]
