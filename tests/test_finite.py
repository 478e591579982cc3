"""NaN/Inf checks of whole tensors (lors_convert.finite): the cheap finite-sum route agrees with
``torch.isfinite`` for every float dtype, including sums that overflow while every value is finite."""

from __future__ import annotations

import pytest
import torch

from lors_convert.finite import all_finite


@pytest.mark.parametrize(
    "values, finite",
    [
        ([1.0, 2.0], True),
        ([1.0, float("nan")], False),
        ([float("inf"), 1.0], False),
        ([-float("inf")], False),
        ([3e38, 3e38], True),  # the sum overflows: the slow path decides
        ([], True),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64, torch.bfloat16])
def test_all_finite_agrees_with_isfinite(values, finite, dtype):
    t = torch.tensor(values, dtype=torch.float32).to(dtype)
    expected = bool(torch.isfinite(t).all())  # 3e38 is inf in float16/bfloat16 too
    assert all_finite(t) is expected
    assert all_finite(t.reshape(-1, 1).expand(-1, 3)) is expected
    if dtype == torch.float32:
        assert expected is finite
    assert all_finite(
        torch.full((70_000,), 60_000.0, dtype=torch.float16)
    )  # float16 sums overflow; values do not
