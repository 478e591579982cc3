"""Conversion across the model table: exact full-rank round trip, rank-8 function equality with
the merged model, the Eckart-Young identity and the parameter formula."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import distinct_numel, expected_ranks, max_rel_diff, reference_errors, snapshot

from lors_convert import convert, count_parameters, merge
from lors_convert.decompose.topk import route
from lors_convert.layers import LorsModule
from tests.models import CASES, SMALL

FULL_RANK_CASES = SMALL + ["minilm"]
RANK8_CASES = SMALL + ["minilm"]


def _check_same_keys(merged: dict, source: dict) -> None:
    assert list(merged) == list(source)
    for k in source:
        assert merged[k].shape == source[k].shape, k
        assert merged[k].dtype == source[k].dtype, k


@pytest.mark.parametrize("name", FULL_RANK_CASES)
def test_full_rank_round_trip_reproduces_every_tensor(name):
    """rank=None then merge: every source tensor back within 1e-5 * max|W| (design section 7)."""
    case = CASES[name]
    model = case.build()
    source = snapshot(model)
    types = {n: type(m) for n, m in model.named_modules()}
    model, report = convert(model, rank=None, require_savings=False)
    for s in report.stacks:  # nothing discarded at full rank: the reported error must say so
        for m in s.matrices:
            assert m.ranks == expected_ranks(None, [1] * len(s.members), tuple(m.shape))
            assert max(m.relative_error) <= 1e-4, (m.name, max(m.relative_error))
    n_lors = sum(isinstance(m, LorsModule) for m in model.modules())
    assert n_lors == sum(len(s.members) * len(s.matrices) for s in report.stacks) > 0
    merged = snapshot(merge(model))
    assert {n: type(m) for n, m in model.named_modules()} == types
    _check_same_keys(merged, source)
    worst = 0.0
    for k, w in source.items():
        if not w.is_floating_point():
            assert torch.equal(merged[k], w), k
            continue
        diff = float((merged[k].double() - w.double()).abs().max())
        scale = float(w.double().abs().max())
        assert diff <= 1e-5 * scale, f"{k}: max abs diff {diff:.3g} > 1e-5 * {scale:.3g}"
        worst = max(worst, diff / scale if scale else 0.0)
    print(f"[{name}] full-rank round trip: max |diff| / max|W| = {worst:.3g}")


@pytest.mark.parametrize("name", RANK8_CASES)
def test_rank8_outputs_error_identity_and_parameter_count(name):
    case = CASES[name]
    model = case.build()
    source = snapshot(model)
    source_params = distinct_numel(model)
    model, report = convert(model, rank=8)
    converted = [(s, m) for s in report.stacks for m in s.matrices]
    assert converted, "rank 8 should save parameters somewhere on every table model"

    # 3. parameter count: d*h + sum_i K_i*r*(d+h) per shared matrix, plus everything untouched
    expected = source_params
    for s, m in converted:
        shape = tuple(source[f"{s.members[0]}.{m.name}"].shape)
        d, h = shape[0], math.prod(shape[1:])
        ranks = expected_ranks(8, [1] * len(s.members), shape)
        assert m.ranks == ranks, m.name
        expected += d * h + sum(ranks) * (d + h) - len(s.members) * d * h
    assert distinct_numel(model) == expected
    assert count_parameters(model) == expected
    assert report.params_after == expected and report.params_before == source_params

    # 2a. the LORS model computes the same function as its merged dense model (within 1e-4 relative)
    y_lors = case.forward(model)
    merge(model)
    y_dense = case.forward(model)
    rel = max_rel_diff(y_lors, y_dense)
    assert rel <= 1e-4, f"LORS vs merged outputs differ by {rel:.3g} (relative)"

    # 2b. Eckart-Young: the reported error is the actual one, which is the discarded spectrum's
    merged = snapshot(model)
    _check_same_keys(merged, source)
    worst = 0.0
    for s, m in converted:
        keys = [f"{member}.{m.name}" for member in s.members]
        ref = reference_errors([source[k] for k in keys], m.ranks)
        actual = [
            float(
                torch.linalg.matrix_norm(
                    (merged[k].double() - source[k].double()).reshape(len(merged[k]), -1)
                )
                / torch.linalg.matrix_norm(source[k].double().reshape(len(source[k]), -1))
            )
            for k in keys
        ]
        d, h = m.matrix
        # exact routes meet Eckart-Young; randomized ones (large matrices, small ranks) come within
        # 1% of it, and report the error their factors have
        exact = route(min(d, h), max(d, h), m.ranks[0]) in ("eigh", "svd")
        for i, (r, rep, act) in enumerate(zip(ref, m.relative_error, actual, strict=False)):
            assert abs(rep - act) <= 1e-5, f"{keys[i]}: reported error {rep:.6f} vs actual {act:.6f}"
            assert act >= r - 1e-4 and (act <= r + 1e-4 or not exact and act <= 1.01 * r), (
                f"{keys[i]}: actual error {act:.6f} vs discarded spectrum {r:.6f}"
            )
            worst = max(worst, abs(act - r))
        assert all(0.0 <= e <= 1.0 for e in m.retained_energy)
    print(f"[{name}] rank 8: outputs rel diff {rel:.3g}; EY identity max deviation {worst:.3g}")


@pytest.mark.parametrize("name", SMALL)
def test_full_rank_lors_model_computes_the_source_function(name):
    """Without merging: the full-rank LORS model's outputs equal the source model's (1e-4 relative)."""
    case = CASES[name]
    model = case.build()
    y_source = case.forward(model)
    model, _ = convert(model, rank=None, require_savings=False)
    assert any(isinstance(m, LorsModule) for m in model.modules())
    rel = max_rel_diff(case.forward(model), y_source)
    assert rel <= 1e-4, f"full-rank LORS vs source outputs differ by {rel:.3g}"
