"""lors: Low-Rank Residual Structure (LORS) surgery for stacked networks.

Public API::

    from lors_convert import find_stacks, convert, merge, load, save, count_parameters
    lors_model, report = convert(model, rank=8)          # in place; report of the savings
    save(lors_model, "model.lors", report)               # checkpoint directory
    lors_model = load("model.lors")                      # runnable, trainable
    dense = merge(lors_model)                             # original classes, keys, shapes, dtypes

The names are imported on first use (PEP 562), so ``import lors_convert`` and the CLI's usage
errors do not wait for torch. The package is layered (``docs/architecture.md``); a lower layer never
imports a higher one.
"""

from __future__ import annotations

import importlib

from .errors import LorsError, LorsUsageError
from .version import __version__

_API = {  # public name -> the module that defines it
    "convert": ".api",
    "merge": ".swap",
    "plan_conversion": ".discover.plan",
    "find_stacks": ".discover.stacks",
    "Stack": ".discover.stacks",
    "save": ".checkpoint",
    "load": ".checkpoint",
    "merge_checkpoint": ".checkpoint",
    "Checkpoint": ".checkpoint",
    "count_parameters": ".counting",
    "Report": ".report",
    "ConvertOptions": ".options",
}

__all__ = [*_API, "LorsError", "LorsUsageError", "__version__"]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
