"""Rank allocation under a global parameter budget: greedy water-filling over residual spectra.

Pure functions. Each stacked parameter is an :class:`BudgetItem`: N layers of ``(d, h)`` matrices
and, per layer, the energies ``s_j^2`` (descending) that each further rank unit would remove from
that layer's error (the whitened residual spectrum for calibrated conversion, the plain one
otherwise). Exact parameter costs:

- LORS: ``d*h`` for the shared part (0 with ``shared=False``) plus ``(d + h)`` per rank unit, and
  ``d*h`` for each layer kept dense inside the stack;
- dense: ``N*d*h`` and no error.

Greedy: every item starts at rank 0 (cost: its shared part); rank units are bought in order of
removed energy per parameter, ``s_j^2 / (d + h)``, across all items and layers, while they fit in
the budget. A layer whose next unit would make its factors cost as much as its dense matrix
(``k (d + h) >= d*h``: a rank at or above break-even ``d*h / (d + h)``) is kept dense inside the
stack instead, for at most one more unit and zero error: no layer is ever given a rank that costs
more than the exact dense layer. An item whose next step would make it cost as much as staying
dense altogether is switched to dense (zero error, it did not break even). For per-layer spectra
that decrease this is the water-filling solution of the relaxed problem; it stops within one unit
``(d + h)`` of the budget.

Sharing: :func:`allocate_with_sharing` also chooses, per stacked parameter, between the LORS
structure (a shared part plus private ranks, spectra of the residuals) and private-only low rank
(spectra of the layers themselves). Pretrained layers often share too little for ``W_s`` to pay its
``d*h`` parameters (docs/calibration.md, sharing).
Coordinate descent: from every parameter shared, and again from every parameter private, flip one
choice at a time while the greedy allocation of the flipped set has a lower total error; the
better end point wins, so the choice is never worse than either extreme.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import LorsUsageError


@dataclass
class BudgetItem:
    """One stacked parameter for the allocator."""

    d: int
    h: int
    spectra: list[Sequence[float]]  # per layer: error removed by each rank unit, descending
    shared: bool = True  # False: per-layer low rank without a shared part
    name: str = ""
    weight: float = 1.0  # multiplies the spectra (e.g. 1 / output energy)

    @property
    def n_layers(self) -> int:
        return len(self.spectra)

    @property
    def unit_cost(self) -> int:
        return self.d + self.h

    @property
    def base_cost(self) -> int:
        return self.d * self.h if self.shared else 0

    @property
    def dense_cost(self) -> int:
        return self.n_layers * self.d * self.h

    @property
    def layer_cost(self) -> int:
        """One layer kept dense inside the stack."""
        return self.d * self.h

    def lors_cost(self, ranks: Sequence[int], dense_layers: Sequence[bool] | None = None) -> int:
        dense_layers = dense_layers or [False] * len(ranks)
        return (
            self.base_cost
            + self.unit_cost * sum(k for k, dn in zip(ranks, dense_layers, strict=False) if not dn)
            + self.layer_cost * sum(map(bool, dense_layers))
        )

    def error(self, ranks: Sequence[int], dense_layers: Sequence[bool] | None = None) -> float:
        dense_layers = dense_layers or [False] * len(ranks)
        return self.weight * sum(
            float(sum(s[k:])) for s, k, dn in zip(self._lists(), ranks, dense_layers, strict=False) if not dn
        )

    def _lists(self) -> list[list[float]]:
        return [s.tolist() if isinstance(s, torch.Tensor) else list(s) for s in self.spectra]


@dataclass
class Allocation:
    ranks: list[list[int]]  # per item, per layer (meaningless for dense items; 0 for dense layers)
    dense: list[bool]  # per item: stays dense
    params: int  # stacked parameters after conversion
    dense_params: int  # stacked parameters before
    budget: int
    error: float  # total remaining (weighted) error
    per_item_error: list[float] = field(default_factory=list)
    dense_layers: list[list[bool]] = field(
        default_factory=list
    )  # per item, per layer: kept dense in the stack

    @property
    def fraction(self) -> float:
        return self.params / self.dense_params if self.dense_params else 0.0


def evaluate(
    items: Sequence[BudgetItem],
    ranks: list[list[int]],
    dense: list[bool] | None = None,
    budget: int = 0,
    dense_layers: list[list[bool]] | None = None,
) -> Allocation:
    """Cost and error of a given allocation (e.g. uniform rank) in the same terms as the greedy."""
    dense = dense or [False] * len(items)
    dense_layers = dense_layers or [[False] * it.n_layers for it in items]
    errors = [
        0.0 if dn else it.error(r, dl)
        for it, r, dn, dl in zip(items, ranks, dense, dense_layers, strict=False)
    ]
    params = sum(
        it.dense_cost if dn else it.lors_cost(r, dl)
        for it, r, dn, dl in zip(items, ranks, dense, dense_layers, strict=False)
    )
    return Allocation(
        ranks=ranks,
        dense=list(dense),
        params=params,
        dense_params=sum(it.dense_cost for it in items),
        budget=budget,
        error=sum(errors),
        per_item_error=errors,
        dense_layers=[list(dl) for dl in dense_layers],
    )


def minimum_params(items: Sequence[BudgetItem]) -> int:
    """The cheapest conversion: every item at rank 0 (shared parts only)."""
    return sum(min(it.base_cost, it.dense_cost) for it in items)


def allocate_ranks(items: Sequence[BudgetItem], budget: float | int, fraction: bool = True) -> Allocation:
    """Greedy water-filling of rank units under ``budget``.

    ``budget`` is a fraction of the items' dense parameters (``fraction=True``, e.g. 0.4) or an
    absolute parameter count. Raises :class:`LorsUsageError` when the budget is below the cost of the
    shared parts alone.
    """
    items = list(items)
    dense_total = sum(it.dense_cost for it in items)
    if fraction:
        if not budget > 0:
            raise LorsUsageError(
                f"budget must be a positive fraction of the stacked parameters, got {budget}"
            )
        limit = int(round(float(budget) * dense_total))
    else:
        limit = int(budget)
    floor_cost = minimum_params(items)
    if limit < floor_cost:
        raise LorsUsageError(
            f"budget {budget} ({limit} parameters) is below the cost of the shared parts alone "
            f"({floor_cost} parameters = {floor_cost / max(dense_total, 1):.3f} of the stacked parameters)"
        )
    lists = [it._lists() for it in items]
    ranks = [[0] * it.n_layers for it in items]
    dense = [False] * len(items)
    dense_layers = [[False] * it.n_layers for it in items]
    cost = floor_cost
    heap: list[tuple[float, int, int]] = []
    for a, it in enumerate(items):
        for i, s in enumerate(lists[a]):
            if s:
                heapq.heappush(heap, (-it.weight * s[0] / it.unit_cost, a, i))
    while heap:
        _, a, i = heapq.heappop(heap)
        if dense[a] or dense_layers[a][i]:
            continue
        it = items[a]
        current = it.lors_cost(ranks[a], dense_layers[a])
        k = ranks[a][i]
        layer_goes_dense = (k + 1) * it.unit_cost >= it.layer_cost  # the next unit reaches break-even
        step = it.layer_cost - k * it.unit_cost if layer_goes_dense else it.unit_cost
        if current + step >= it.dense_cost:
            step = it.dense_cost - current  # switching the item to dense: zero error, it does not break even
            if cost + step <= limit:
                dense[a] = True
                cost += step
            continue
        if cost + step > limit:
            continue  # does not fit; cheaper units of other items may
        cost += step
        if layer_goes_dense:  # exact for at most one unit more: never a rank above break-even
            dense_layers[a][i], ranks[a][i] = True, 0
            continue
        ranks[a][i] += 1
        if k + 1 < len(lists[a][i]):
            heapq.heappush(heap, (-it.weight * lists[a][i][k + 1] / it.unit_cost, a, i))
    result = evaluate(items, ranks, dense, limit, dense_layers)
    assert result.params == cost
    return result


def allocate_with_sharing(
    shared: Sequence[BudgetItem],
    private: Sequence[BudgetItem],
    budget: float | int,
    fraction: bool = True,
    max_passes: int = 4,
) -> tuple[list[bool], Allocation]:
    """Per parameter, shared part or not, and the ranks: the choice with the lowest total error found.

    ``shared[j]`` and ``private[j]`` describe the same stacked parameter (``private[j].shared`` is
    False). Returns the choice (True: keep a shared part) and the allocation of the chosen items.
    Coordinate descent from both extremes, all shared (when that fits the budget) and all private,
    each flip kept only when it lowers the error, at most ``max_passes`` sweeps each; the better of
    the two wins. So the result is never worse than ``sharing="always"`` or ``"never"`` in this
    objective (descent from all shared alone was: it stops where no single flip helps, and on
    random spectra that is often above all private).
    """
    if len(shared) != len(private) or any(p.shared for p in private):
        raise ValueError("allocate_with_sharing needs one shared and one private-only item per parameter")

    def run(choice: list[bool]) -> Allocation | None:
        try:
            return allocate_ranks(
                [s if c else p for s, p, c in zip(shared, private, choice, strict=False)], budget, fraction
            )
        except LorsUsageError:  # the shared parts alone exceed the budget
            return None

    def descend(choice: list[bool], best: Allocation) -> tuple[list[bool], Allocation]:
        for _ in range(max_passes):
            improved = False
            for j in range(len(choice)):
                trial = choice[:j] + [not choice[j]] + choice[j + 1 :]
                alloc = run(trial)
                if alloc is not None and alloc.error < best.error:
                    choice, best, improved = trial, alloc, True
            if not improved:
                break
        return choice, best

    none_shared = [False] * len(shared)
    results = [descend(none_shared, allocate_ranks(private, budget, fraction))]  # raises only for budget <= 0
    all_shared = run([True] * len(shared))
    if all_shared is not None:
        results.append(descend([True] * len(shared), all_shared))
    return min(results, key=lambda r: r[1].error)  # a tie keeps the descent from all private


def uniform_ranks(items: Sequence[BudgetItem], rank: int) -> Allocation:
    """Every layer of every item at the same rank (clamped to ``min(d, h)``), for comparisons."""
    ranks = [[min(rank, it.d, it.h)] * it.n_layers for it in items]
    return evaluate(items, ranks)


__all__ = [
    "BudgetItem",
    "Allocation",
    "allocate_ranks",
    "allocate_with_sharing",
    "uniform_ranks",
    "evaluate",
    "minimum_params",
]
