"""ConvertOptions: one set of defaults, checked once when built, taken by every way into a conversion."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lors_convert import ConvertOptions, LorsUsageError, convert
from tests.models import CASES


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(rank=0), "rank must be a positive integer or 'full', got 0"),
        (dict(init="xavier"), "init must be one of svd, paper, got 'xavier'"),
        (dict(method="lanczos"), "method must be one of auto, exact, randomized, got 'lanczos'"),
        (dict(sharing="sometimes"), "sharing must be one of auto, always, never, got 'sometimes'"),
        (dict(refine=-1), "refine must be an integer >= 0, got -1"),
        (dict(budget=0.0), "budget must be a positive fraction of the stacked parameters, got 0.0"),
        (dict(init="paper", budget=0.5), "apply to init='svd' only"),
    ],
)
def test_bad_values_are_refused_when_built(changes, message):
    with pytest.raises(LorsUsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ConvertOptions(**changes)
    with pytest.raises(LorsUsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ConvertOptions.of(ConvertOptions(), **changes)  # a change is checked as a new value


def test_options_are_frozen_and_changes_name_fields():
    options = ConvertOptions.of(rank=4, sharing="never")
    assert (options.rank, options.sharing, options.groups) == (4, "never", None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.rank = 8
    with pytest.raises(TypeError, match="unknown conversion option"):
        ConvertOptions.of(rnak=4)


def test_convert_takes_options_or_keywords_alike():
    torch.manual_seed(0)
    a_model, a = convert(CASES["gpt2"].build(), ConvertOptions(rank=4, groups=[1, 1, 2, 2]))
    torch.manual_seed(0)
    b_model, b = convert(CASES["gpt2"].build(), rank=4, groups=[1, 1, 2, 2])
    assert a.to_dict() == b.to_dict()
    for (ka, va), (kb, vb) in zip(a_model.state_dict().items(), b_model.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    with pytest.raises(TypeError, match="must be a ConvertOptions"):
        convert(CASES["gpt2"].build(), 4)
