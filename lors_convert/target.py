"""``--target``: the smallest budget whose calibrated conversion keeps a fidelity target on held-out data.

One calibration (the Grams are reused by every candidate, and so are their cached
square roots, the budget's spectra, its shared-part solves and each parameter's fit up to
its truncation: :class:`~lors_convert.fit.SearchMemo`), then a bracketing search over the fraction
``b`` of stacked parameters kept: each candidate converts a copy of the source's module tree that
borrows its tensors (so a candidate takes only the memory of the LORS layers it gains; the chosen
one gets its own tensors at the end) and is measured against the source (whose outputs are kept
between candidates while they fit in ``REFERENCE_KEEP_BYTES``), and the chosen candidate's report
carries its measurement. Fidelity is assumed to grow with the budget; every point tried is kept as
the explored frontier (fraction -> fidelity).

The search (:func:`next_budget`) keeps the bracket ``[low, high]``: the largest budget that missed
the target below the smallest that met it, and stops when it is ``TOLERANCE`` wide. A fidelity's
shortfall from the dense model's, ``L`` (``1 - cosine``, ``1 - top1``, ``log ppl_ratio``,
``rel_error``), falls close to a power of the fraction left out, ``L ~ c (1 - b)^p``, so the next
budget is where the line through the bracket's two points in ``(log(1 - b), log L)`` reaches the
target's shortfall, moved a quarter of ``TOLERANCE`` past it to the side that would close the bracket;
the midpoint where no such line exists (an end not yet measured, or a shortfall of zero).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from torch import nn

from .calibrate.fidelity import Reference, fidelity
from .conversion import Progress, convert
from .errors import LorsError, LorsUsageError
from .fit import SearchMemo
from .io.memory import borrowing_copy, stop_borrowing
from .options import FIDELITY_METRICS, METRICS, ConvertOptions, Target
from .report import Report

FIRST, HIGHEST = 0.5, 0.95  # the first budget tried, and the highest one
STEPS = 6  # candidates at most
TOLERANCE = 0.02  # the search ends when a budget that met the target is this close above one that missed
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
    """Search the budget for ``target`` (:func:`next_budget`); returns the smallest passing converted
    model, its report and every point tried (sorted by budget). Each candidate is ``options`` with its budget, calibrated by
    ``calibration``. ``model`` is not changed. Raises :class:`LorsError` when no budget up to
    ``HIGHEST`` meets the target (only the dense model does)."""
    options = options or ConvertOptions()
    points: list[Point] = []
    best: tuple[float, nn.Module, Report] | None = None
    budget: float | None = FIRST
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
        budget = next_budget(points, target)
        if budget is None:
            break
    points.sort(key=lambda p: p.budget)
    if best is None:
        tried = ", ".join(f"{p.budget:.3f}" for p in points)
        raise LorsError(
            f"no budget meets --target {target} (tried {tried}): only the dense model does; nothing written"
        )
    return stop_borrowing(best[1], model), best[2], points


def next_budget(points: list[Point], target: Target) -> float | None:
    """The next budget to try after ``points`` (in the order tried, the last one just measured), or
    None when the search is done: the bracket is ``TOLERANCE`` wide, or nothing up to ``HIGHEST``
    meets the target."""
    met = [p for p in points if p.meets]
    if not met:
        return None if max(p.budget for p in points) >= HIGHEST else HIGHEST
    high = min(met, key=lambda p: p.budget)
    below = [p for p in points if not p.meets and p.budget < high.budget]
    low = max(below, key=lambda p: p.budget) if below else None
    low_budget = low.budget if low is not None else 0.0
    if high.budget - low_budget <= TOLERANCE:
        return None
    aim = None if low is None else _power_law_root(low, high, target)
    if aim is None:
        return (low_budget + high.budget) / 2
    aim += -TOLERANCE / 4 if points[-1].meets else TOLERANCE / 4  # past the root, to close the bracket
    return min(max(aim, low_budget + TOLERANCE / 4), high.budget - TOLERANCE / 4)


def _shortfall(target: Target, value) -> float | None:
    """How far a fidelity figure is from the dense model's (0 there), or None for no figure."""
    if value is None:
        return None
    if target.key == "ppl_ratio":
        return math.log(value) if value > 0 else None
    return 1.0 - value if METRICS[target.metric][1] else value


def _power_law_root(low: Point, high: Point, target: Target) -> float | None:
    """The budget where the line through ``low`` and ``high`` in ``(log(1 - b), log shortfall)``
    reaches the target's shortfall; None where the line does not exist or does not cross it."""
    key = f"heldout_{target.key}"
    losses = [_shortfall(target, v) for v in (low.quality.get(key), high.quality.get(key), target.value)]
    if any(v is None or v <= 0 for v in losses) or high.budget >= 1:
        return None
    y_low, y_high, y_goal = (math.log(v) for v in losses)
    if not y_high < y_goal <= y_low:
        return None  # not decreasing across the bracket
    x_low, x_high = math.log1p(-low.budget), math.log1p(-high.budget)
    return -math.expm1(x_low + (y_goal - y_low) * (x_high - x_low) / (y_high - y_low))


def _try(model, reference: Reference, target: Target, options: ConvertOptions, calibration, progress, memo):
    """Convert a borrowing copy of ``model`` at ``options.budget`` and measure it: the point, the
    candidate and its report (None, None when the budget gives no conversion)."""
    try:
        candidate, report = convert(
            borrowing_copy(model), options, calibration=calibration, progress=progress, memo=memo
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


__all__ = ["Point", "search_budget", "next_budget", "REFERENCE_KEEP_BYTES", "TOLERANCE"]
