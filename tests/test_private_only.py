"""Private-only stacks (no shared part, ``W_i = B_i A_i``): what a rank budget picks where layers
share too little for ``W_s`` to pay its ``d*h`` parameters.

Across the model table: parameter count, per-layer Eckart-Young error, LORS = merged function,
checkpoint round trip and the weights-only merge. Then the choice itself: shared where the layers
are near copies, private where they are independent, never worse than either extreme.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from conftest import distinct_numel, max_rel_diff, snapshot
from torch import nn

from lors_convert import convert, count_parameters, load, merge, merge_checkpoint, save
from lors_convert.decompose.budget import BudgetItem, allocate_ranks, allocate_with_sharing
from lors_convert.errors import LorsUsageError
from lors_convert.layers import LorsModule
from tests.models import CASES, SMALL


def _svd_tail(w: torch.Tensor, k: int) -> float:
    """Relative Frobenius error of the best rank-k approximation of ``w`` alone (Eckart-Young)."""
    s = torch.linalg.svdvals(w.double().reshape(len(w), -1))
    return float(s[k:].norm() / s.norm())


@pytest.mark.parametrize("name", SMALL)
def test_private_only_conversion_across_the_table(name, tmp_path):
    case = CASES[name]
    model = case.build()
    source = snapshot(model)
    source_params = distinct_numel(model)
    model, report = convert(model, budget=0.5, sharing="never")
    converted = [(s, m) for s in report.stacks for m in s.matrices]
    assert converted and not any(m.shared for _, m in converted)
    assert not any(n.endswith(".shared") for n in model.state_dict())

    expected = source_params  # factors only: sum_i k_i (d + h) replaces N d h
    for s, m in converted:
        shape = tuple(source[f"{s.members[0]}.{m.name}"].shape)
        d, h = shape[0], math.prod(shape[1:])
        expected += sum(m.ranks) * (d + h) - len(s.members) * d * h
        assert m.lors_params == sum(m.ranks) * (d + h)
    assert count_parameters(model) == distinct_numel(model) == report.params_after == expected

    y_lors = case.forward(model)
    path = tmp_path / "ckpt.lors"
    save(model, path, report)
    reloaded = load(path, model=case.build(seed=1))  # another dense instance: only its structure is used
    assert max_rel_diff(case.forward(reloaded), y_lors) <= 1e-6
    merge_checkpoint(path, tmp_path / "dense.safetensors")
    from safetensors.torch import load_file

    dense_file = load_file(str(tmp_path / "dense.safetensors"))
    merged = snapshot(merge(model))
    assert dense_file.keys() == source.keys()
    for k, w in merged.items():
        assert torch.equal(dense_file[k], w), k  # the weights-only merge is the in-memory merge, bit for bit
    assert max_rel_diff(case.forward(model), y_lors) <= 1e-4

    for s, m in converted:  # each layer is its own best rank-k_i approximation (no mean subtracted)
        for member, k, rep in zip(s.members, m.ranks, m.relative_error, strict=False):
            key = f"{member}.{m.name}"
            want = _svd_tail(source[key], k)
            got = float((merged[key].double() - source[key].double()).norm() / source[key].double().norm())
            assert abs(got - want) <= 1e-4 and abs(rep - want) <= 1e-4, (key, got, rep, want)


class Pair(nn.Module):
    """Two stacked Linear types: ``near`` layers are one matrix plus 1% noise, ``apart`` layers independent."""

    def __init__(self, n: int = 6, d: int = 48) -> None:
        super().__init__()
        base = torch.randn(d, d)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"near": nn.Linear(d, d), "apart": nn.Linear(d, d)}) for _ in range(n)
        )
        with torch.no_grad():
            for b in self.blocks:
                b["near"].weight.copy_(base + 0.01 * torch.randn(d, d))

    def forward(self, x):
        for b in self.blocks:
            x = torch.tanh(b["apart"](b["near"](x)))
        return x


def test_budget_shares_near_copies_and_not_independent_layers():
    torch.manual_seed(0)
    model = Pair()
    x = torch.randn(4, 48)
    lors, report = convert(model, budget=0.45)
    by_name = {m.name: m for s in report.stacks for m in s.matrices}
    assert by_name["near.weight"].shared and not by_name["apart.weight"].shared
    assert isinstance(lors.blocks[0]["near"].shared, nn.Parameter) and lors.blocks[0]["apart"].shared is None
    assert abs(report.quality["stacked_fraction"] - 0.45) <= 0.01 * 0.45
    with torch.no_grad():
        assert max_rel_diff(lors(x), merge(lors)(x)) <= 1e-4
    assert max(by_name["near.weight"].relative_error) < 0.02  # the shared part holds the common matrix


def _random_items(rng: random.Random, shared: bool, n_items: int = 5):
    items = []
    for j in range(n_items):
        d, h = rng.choice([(16, 16), (16, 32), (32, 8)])
        spectra = [sorted((rng.random() ** 3 for _ in range(min(d, h))), reverse=True) for _ in range(4)]
        items.append(BudgetItem(d=d, h=h, spectra=spectra, shared=shared, name=f"p{j}"))
    return items


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("budget", [0.15, 0.4, 0.7])
def test_sharing_choice_is_no_worse_than_either_extreme(seed, budget):
    rng = random.Random(seed)
    shared = _random_items(rng, True)
    private = [
        BudgetItem(
            d=s.d, h=s.h, spectra=[[0.5 * v for v in sp] for sp in s.spectra], shared=False, name=s.name
        )
        for s in _random_items(rng, False)
    ]
    for s, p in zip(shared, private, strict=False):  # same matrix shapes: the same parameter, two structures
        p.d, p.h = s.d, s.h
        p.spectra = [sp[: min(s.d, s.h)] for sp in p.spectra]
    choice, alloc = allocate_with_sharing(shared, private, budget)
    chosen = [s if c else p for s, p, c in zip(shared, private, choice, strict=False)]
    again = allocate_ranks(chosen, budget)
    assert alloc.error == pytest.approx(again.error) and alloc.params == again.params
    assert alloc.params <= alloc.budget
    assert alloc.error <= allocate_ranks(private, budget).error + 1e-12
    try:
        all_shared = allocate_ranks(shared, budget).error
    except LorsUsageError:  # the shared parts alone exceed the budget
        return
    assert alloc.error <= all_shared + 1e-12


def test_allocate_with_sharing_needs_matching_private_items():
    rng = random.Random(0)
    with pytest.raises(ValueError):
        allocate_with_sharing(_random_items(rng, True), _random_items(rng, True), 0.5)


def test_sharing_option_values():
    torch.manual_seed(0)
    with pytest.raises(LorsUsageError, match="sharing must be one of auto, always, never"):
        convert(Pair(), budget=0.45, sharing="sometimes")
    _, report = convert(Pair(), budget=0.45, sharing="never", refine=2)
    assert any("refine=2 had nothing to refine" in w for w in report.warnings)
    lors, report = convert(Pair(), budget=0.45, sharing="always", refine=2)
    assert not any("nothing to refine" in w for w in report.warnings)
    assert all(m.shared for s in report.stacks for m in s.matrices)
    assert not any(isinstance(m, LorsModule) and m.shared is None for m in lors.modules())


@pytest.mark.parametrize("orientation", ["out_in", "in_out"])
def test_sharing_spectra_equal_the_two_separate_computations(orientation):
    from lors_convert.decompose.whiten import shared_and_spectra, sharing_spectra

    torch.manual_seed(0)
    weights = [torch.randn(12, 20) for _ in range(3)]
    n_in = 20 if orientation == "out_in" else 12
    n_out = 32 - n_in
    grams = [(lambda x: x.T @ x)(torch.randn(40, n_in, dtype=torch.float64)) for _ in range(3)]
    outs = [(lambda x: x.T @ x)(torch.randn(40, n_out, dtype=torch.float64)) for _ in range(3)]
    S, residual, alone = sharing_spectra(weights, grams, orientation, out_grams=outs)
    S2, residual2 = shared_and_spectra(weights, grams, orientation, out_grams=outs)
    none, alone2 = shared_and_spectra(weights, grams, orientation, shared=False, out_grams=outs)
    assert none is None and torch.allclose(S, S2)
    for a, b in zip(residual + alone, residual2 + alone2, strict=False):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10)
    # the layers' own spectra hold all of each layer's whitened energy; the residual ones less in total
    assert sum(float(a.sum()) for a in alone) > sum(float(r.sum()) for r in residual)
