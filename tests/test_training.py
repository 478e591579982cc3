"""Training a LORS model: an optimizer step moves its factors, frozen weights stay frozen, and its
state dict loads into a fresh skeleton."""

from __future__ import annotations

import pytest
import torch

from lors_convert import convert, plan_conversion
from lors_convert.layers import LorsLayer
from lors_convert.swap import build_skeleton
from tests.models import CASES, SMALL, run


def _lors_layers(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LorsLayer)]


@pytest.mark.parametrize("name", SMALL)
def test_one_optimizer_step_changes_private_factors(name):
    case = CASES[name]
    model, _ = convert(case.build(), rank=8)
    model.train()
    layers = _lors_layers(model)
    assert layers
    before = {n: (m.lors_A.detach().clone(), m.lors_B.detach().clone()) for n, m in layers}
    shared_before = {id(m.shared): m.shared.detach().clone() for _, m in layers}
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    out = case.output(run(model, case.inputs())).float()
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    loss = (out - target).square().mean()  # (not out**2: a final LayerNorm makes that constant)
    assert torch.isfinite(loss), loss
    loss.backward()
    opt.step()
    for n, m in layers:
        A0, B0 = before[n]
        for p, p0 in ((m.lors_A, A0), (m.lors_B, B0)):  # plain SGD: the step is -lr times this gradient
            assert torch.allclose(p.detach(), p0 - 1e-2 * p.grad, rtol=1e-6, atol=1e-7), n
        assert not torch.equal(m.lors_A.detach(), A0), f"{n}.lors_A did not move"
        assert not torch.equal(m.lors_B.detach(), B0), f"{n}.lors_B did not move"
    for _, m in layers:
        assert not torch.equal(m.shared.detach(), shared_before[id(m.shared)])
    # every parameter the optimizer saw is distinct storage: a shared matrix is one Parameter
    ptrs = [p.data_ptr() for p in model.parameters()]
    assert len(ptrs) == len(set(ptrs))


@pytest.mark.parametrize("name", SMALL)
def test_state_dict_round_trip_through_fresh_skeleton(name):
    case = CASES[name]
    groups = None if name != "mlp" else [1, 1, 2, 2]
    model, _ = convert(case.build(), rank=8, groups=groups)
    with torch.no_grad():  # move off the SVD fit so a skeleton that ignored B/A could not pass
        for _, m in _lors_layers(model):
            m.lors_A.mul_(1.5)
    state = model.state_dict()
    y = case.forward(model)

    fresh = case.build(seed=1234)  # other weights: only the loaded state can make outputs agree
    assert not torch.allclose(case.forward(fresh), y)
    plan = plan_conversion(fresh, rank=8, groups=groups)
    build_skeleton(fresh, plan)
    assert list(fresh.state_dict()) == list(state)
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(case.forward(fresh), y)

    # the skeleton shares exactly like the converted model: one Parameter per stacked matrix
    def sharing(m):
        return sorted(
            sorted(n for n, lay in _lors_layers(m) if lay.shared is s)
            for s in {id(lay.shared): lay.shared for _, lay in _lors_layers(m)}.values()
        )

    assert sharing(fresh) == sharing(model)


def test_frozen_weights_stay_frozen():
    """A frozen source converts to frozen LORS parameters; one frozen member freezes only its factors."""
    frozen = CASES["mlp"].build()
    frozen.requires_grad_(False)
    model, _ = convert(frozen, rank=4)
    layers = _lors_layers(model)
    assert layers and not any(p.requires_grad for _, m in layers for p in m.parameters())

    partly = CASES["mlp"].build()
    first = plan_conversion(partly, rank=4).params[0]
    partly.get_parameter(first.keys[0]).requires_grad_(False)
    model, _ = convert(partly, rank=4)
    owner = first.keys[0].rpartition(".")[0]
    layer = model.get_submodule(owner)
    assert layer.shared.requires_grad  # the other members still train it
    assert not layer.lors_A.requires_grad and not layer.lors_B.requires_grad
    other = model.get_submodule(first.keys[1].rpartition(".")[0])
    assert other.lors_A.requires_grad and other.lors_B.requires_grad
