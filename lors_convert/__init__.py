"""lors: Low-Rank Residual Structure (LORS) surgery for stacked networks.

Public API::

    from lors_convert import find_stacks, convert, merge, load, save, count_parameters
    lors_model, report = convert(model, rank=8)          # in place; report of the savings
    save(lors_model, "model.lors", report)               # checkpoint directory
    lors_model = load("model.lors")                      # runnable, trainable
    dense = merge(lors_model)                             # original classes, keys, shapes, dtypes

The package is layered (``docs/architecture.md``): ``cli`` > ``convert``/``heal``/``sweep`` >
``checkpoint`` > ``swap`` > ``fit``/``calibrate`` > ``discover`` > ``layers`` > ``decompose``/``io``
> ``errors``/``report``/``counting``; a lower layer never imports a higher one.
"""
from __future__ import annotations

from .checkpoint import Checkpoint, load, merge_checkpoint, save
from .convert import convert
from .counting import count_parameters
from .discover.plan import plan_conversion
from .discover.stacks import Stack, find_stacks
from .errors import LorsError, LorsUsageError
from .report import Report
from .swap import merge
from .version import __version__

__all__ = ["find_stacks", "convert", "merge", "save", "load", "merge_checkpoint", "Checkpoint", "plan_conversion",
           "count_parameters", "Stack", "Report", "LorsError", "LorsUsageError", "__version__"]
