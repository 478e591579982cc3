"""Stack discovery and the selection options: meta device, ResNet stages, include/exclude, usage errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lors_convert import LorsUsageError, convert, find_stacks, plan_conversion
from lors_convert.layers import LorsModule
from lors_convert.zoo.resnet import resnet50, resnext50_32x4d
from tests.models import CASES, SMALL


def _summary(stacks):
    return [
        (
            s.path,
            s.members,
            s.member_class,
            [(p.relname, p.shape, p.dtype) for p in s.params],
            dict(s.excluded),
        )
        for s in stacks
    ]


@pytest.mark.parametrize("name", SMALL + ["minilm"])
def test_meta_device_discovery_matches_real_and_expected(name):
    case = CASES[name]
    seed = 0 if name != "minilm" else 1  # MiniLM: the architecture only (from its config)
    real = case.build(seed=seed)
    with torch.device("meta"):
        meta = case.build(seed=seed)
    assert all(p.device.type == "meta" for p in meta.parameters())
    real_stacks, meta_stacks = find_stacks(real), find_stacks(meta)
    assert _summary(meta_stacks) == _summary(real_stacks)
    assert {s.path: s.members for s in real_stacks} == case.stacks
    real_plan, meta_plan = plan_conversion(real, rank=8), plan_conversion(meta, rank=8)
    assert [(p.keys, p.ranks, p.layer_kind) for p in meta_plan.params] == [
        (p.keys, p.ranks, p.layer_kind) for p in real_plan.params
    ]


def test_resnet50_stages_stack_blocks_1_to_n_minus_1():
    with torch.device("meta"):
        model = resnet50()
    # torchvision resnet50: 320 state-dict entries, 25,557,032 parameters
    assert len(model.state_dict()) == 320
    assert sum(p.numel() for p in model.parameters()) == 25_557_032
    stacks = {s.path: s for s in find_stacks(model)}
    assert {p: s.members for p, s in stacks.items()} == {
        f"layer{i}": [f"layer{i}.{j}" for j in range(1, n)]
        for i, n in zip((1, 2, 3, 4), (3, 4, 6, 3), strict=False)
    }
    for s in stacks.values():  # convs shared; BatchNorm (1-D) stays per block
        assert [p.relname for p in s.params] == ["conv1.weight", "conv2.weight", "conv3.weight"]
    with torch.device("meta"):
        x = resnext50_32x4d()
    assert x.layer1[1].conv2.groups == 32 and tuple(x.layer1[1].conv2.weight.shape) == (128, 4, 3, 3)


def _converted(report):
    return {m.name for s in report.stacks for m in s.matrices}


def test_include_and_exclude_patterns_narrow_the_selection():
    case = CASES["gpt2"]
    everything = {"attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"}
    _, report = convert(case.build(), rank=8)
    assert _converted(report) == everything

    model, report = convert(case.build(), rank=8, include=["*.mlp.*"])
    assert _converted(report) == {"mlp.c_fc.weight", "mlp.c_proj.weight"}
    assert set(report.stacks[0].kept_dense) == {"attn.c_attn.weight", "attn.c_proj.weight"}
    assert not isinstance(model.transformer.h[0].attn.c_attn, LorsModule)
    assert isinstance(model.transformer.h[0].mlp.c_fc, LorsModule)

    _, report = convert(case.build(), rank=8, exclude=["*c_attn*"])
    assert _converted(report) == everything - {"attn.c_attn.weight"}

    _, report = convert(case.build(), rank=8, include=["transformer.h.*.mlp.*"], exclude=["*c_proj*"])
    assert _converted(report) == {"mlp.c_fc.weight"}

    # a pattern matching one member's full name selects the stacked parameter
    _, report = convert(case.build(), rank=8, include=["transformer.h.2.attn.c_proj.weight"])
    assert _converted(report) == {"attn.c_proj.weight"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(include=["*nonexistent*"]), "matches no stacked parameter"),
        (dict(exclude=["*nope*"]), "matches no stacked parameter"),
        (dict(include=["*.mlp.*", "*typo*"]), "'\\*typo\\*'"),
        (dict(include=["*wte*"]), "matches no stacked parameter"),  # the tied embedding is not in a stack
        (dict(exclude=["*"]), "leave no stacked parameter"),
        (dict(groups=[1, 2, 3]), "groups has 3 entries"),
        (dict(groups=0), "groups must be >= 1"),
        (dict(rank=0), "rank must be a positive integer"),
        (dict(rank=2.5), "rank must be a positive integer"),
        (dict(init="xavier"), "init must be one of"),
        (dict(method="lanczos"), "method must be"),
    ],
)
def test_bad_selections_are_usage_errors_and_leave_the_model_untouched(kwargs, message):
    case = CASES["gpt2"]
    model = case.build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LorsUsageError, match=message):
        convert(model, **{"rank": 8, **kwargs})
    assert not any(isinstance(m, LorsModule) for m in model.modules())
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())


def test_leaf_siblings_of_a_plain_module_are_not_a_stack():
    """q/k/v projections of one attention block have equal shapes but are not layers of a stack."""

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    assert find_stacks(Attn()) == []
    stacks = find_stacks(nn.ModuleList(Attn() for _ in range(3)))
    assert [s.members for s in stacks] == [["0", "1", "2"]]
    assert [p.relname for p in stacks[0].params] == ["q.weight", "k.weight", "v.weight"]
    # a different dtype or shape in one member breaks the signature: only the equal ones stack
    blocks = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8).double(), nn.Linear(8, 4))
    assert [s.members for s in find_stacks(blocks)] == [["0", "1"]]


def test_disjoint_slices_of_one_flat_buffer_are_not_ties():
    """vector_to_parameters leaves every weight a view of one vector: independent, so a stack.

    Overlapping views of one buffer are ties and stay dense.
    """
    torch.manual_seed(0)
    model = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))
    torch.nn.utils.vector_to_parameters(torch.randn(3 * (256 + 16)), model.parameters())
    assert len({p.untyped_storage().data_ptr() for p in model.parameters()}) == 1
    [stack] = find_stacks(model)
    assert [p.relname for p in stack.params] == ["weight"] and not stack.excluded
    _, report = convert(model, rank=2)
    assert report.stacks[0].matrices[0].name == "weight"

    flat = torch.randn(3 * 256)
    model = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))
    for layer, start in zip(model, (0, 256, 384), strict=False):  # layer 2 overlaps layer 1 by half
        layer.weight = nn.Parameter(flat[start : start + 256].view(16, 16))
    [stack] = find_stacks(model)
    assert stack.params == [] and "tied" in stack.excluded["weight"]
