"""``--target``: the smallest budget whose calibrated conversion keeps a fidelity target on held-out data.

One calibration (the Grams are reused by every candidate, and so are their cached
eigendecompositions, the budget's spectra, its shared-part solves and each parameter's fit up to
its truncation: :class:`~lors_convert.fit.SearchMemo`), then a bisection over the
fraction of stacked parameters: each candidate converts a copy of the source and is measured
against it (the source's outputs are kept between candidates while they fit in
``REFERENCE_KEEP_BYTES``), and the chosen candidate's report carries its measurement. Fidelity is assumed to grow with the
budget; every point tried is kept as the explored frontier (fraction -> fidelity).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from torch import nn

from .calibrate.fidelity import Reference, fidelity
from .conversion import Progress, convert
from .errors import LorsError, LorsUsageError
from .fit import SearchMemo
from .options import FIDELITY_METRICS, ConvertOptions, Target
from .report import Report

FIRST, STEPS, HIGHEST = 0.5, 6, 0.95  # bisection over (0, HIGHEST]: 6 steps resolve 1/64
REFERENCE_KEEP_BYTES = 512 << 20  # the source's outputs on the probes, kept across candidates


@dataclass
class Point:
    """One budget tried: what it kept and how faithful it was."""

    budget: float
    stacked_fraction: float | None
    params_after: int | None
    quality: dict = field(default_factory=dict)
    meets: bool = False
    note: str = ""

    def to_dict(self, target: Target, prefix: str = "heldout") -> dict:
        return {
            "budget": self.budget,
            "stacked_fraction": self.stacked_fraction,
            "params_after": self.params_after,
            target.key: self.quality.get(f"{prefix}_{target.key}"),
            "meets": self.meets,
            "note": self.note,
            **{
                k.removeprefix(prefix + "_"): v
                for k, v in self.quality.items()
                if k.removeprefix(prefix + "_") in FIDELITY_METRICS
            },
        }


def search_budget(
    model: nn.Module,
    reference: Reference,
    target: Target,
    options: ConvertOptions | None = None,
    calibration=None,
    log: Callable[[str], None] | None = None,
    progress: Progress | None = None,
) -> tuple[nn.Module, Report, list[Point]]:
    """Bisect the budget for ``target``; returns the smallest passing converted model, its report and
    every point tried (sorted by budget). Each candidate is ``options`` with its budget, calibrated by
    ``calibration``. ``model`` is not changed. Raises :class:`LorsError` when no budget up to
    ``HIGHEST`` meets the target (only the dense model does)."""
    options = options or ConvertOptions()
    points: list[Point] = []
    best: tuple[float, nn.Module, Report] | None = None
    low, high, budget = 0.0, None, FIRST  # high: the smallest budget that met the target
    memo = SearchMemo()  # what does not depend on the budget, kept for every candidate
    for _ in range(STEPS):
        point, candidate, report = _try(
            model, reference, target, replace(options, budget=budget), calibration, progress, memo
        )
        if point.meets and (best is None or budget < best[0]):
            best = (budget, candidate, report)
        points.append(point)
        if log is not None:
            log(_describe(point, target))
        if point.meets:
            high = budget
        else:
            low = budget
        if high is None:  # nothing met it yet: try the highest budget, then give up
            if budget >= HIGHEST:
                break
            budget = HIGHEST
        else:
            budget = (low + high) / 2
    points.sort(key=lambda p: p.budget)
    if best is None:
        tried = ", ".join(f"{p.budget:.3f}" for p in points)
        raise LorsError(
            f"no budget meets --target {target} (tried {tried}): only the dense model does; nothing written"
        )
    return best[1], best[2], points


def _try(model, reference: Reference, target: Target, options: ConvertOptions, calibration, progress, memo):
    """Convert a copy of ``model`` at ``options.budget`` and measure it: the point, the candidate and
    its report (None, None when the budget gives no conversion)."""
    try:
        candidate, report = convert(
            copy.deepcopy(model), options, calibration=calibration, progress=progress, memo=memo
        )
    except LorsUsageError as e:  # e.g. the budget keeps every matrix dense
        return Point(options.budget, None, None, note=str(e)), None, None
    quality = fidelity(candidate, reference)
    report.quality.update(quality)
    point = Point(
        options.budget,
        report.quality.get("stacked_fraction"),
        report.params_after,
        quality,
        target.met(quality),
    )
    return point, candidate, report


def _describe(point: Point, target: Target) -> str:
    value = point.quality.get(f"heldout_{target.key}")
    shown = "n/a" if value is None else f"{value:.4f}"
    return (
        f"budget {point.budget:.3f}: {target.key} {shown} "
        f"({'meets' if point.meets else 'misses'} {target}){' ' + point.note if point.note else ''}"
    )


__all__ = ["Point", "search_budget", "REFERENCE_KEEP_BYTES"]
