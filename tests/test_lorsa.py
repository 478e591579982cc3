"""LORSA: HOSVD math, generator conversion round trips, recovery of structured generators, training."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lors_convert import convert, count_parameters, merge, plan_conversion
from lors_convert.decompose.tucker import (
    groups_to_tensor,
    hooi_sweep,
    hosvd,
    project_core,
    tucker_to_tensor,
    unfold,
)
from lors_convert.discover.generators import make_adaptive_hook
from lors_convert.discover.specs import GeneratorSpec
from lors_convert.errors import LorsUsageError
from lors_convert.fit.generator import generator_tensors
from lors_convert.layers import layer_class
from lors_convert.layers.adaptive import Layout, LorsaLinear
from lors_convert.zoo.adamixer import AdaMixerConfig, AdaMixerDecoder, random_inputs

GEN = "*adaptive_mixing.parameter_generator.0.weight"
OUT = "*adaptive_mixing.out_proj.weight"


def generators(model):
    return [st.sampling_n_mixing.adaptive_mixing.parameter_generator[0] for st in model.bbox_head]


def trained_like(cfg: AdaMixerConfig, seed: int = 0) -> AdaMixerDecoder:
    """A tiny decoder with non-zero generators (the official init zeroes the generator weight)."""
    torch.manual_seed(seed)
    model = AdaMixerDecoder(cfg)
    model.init_weights()
    for gen in generators(model):
        nn.init.normal_(gen.weight, std=0.2)
        nn.init.normal_(gen.bias, std=0.2)
    return model.eval()


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


# --- tucker math ------------------------------------------------------------------------------


def test_full_rank_hosvd_is_exact_and_factors_are_orthonormal():
    torch.manual_seed(0)
    D = torch.randn(6, 5, 7)
    f = hosvd(D, 6, 5)
    assert rel(groups_to_tensor(f), D) < 1e-5
    assert torch.allclose(f.B.T @ f.B, torch.eye(6), atol=1e-5)
    assert torch.allclose(f.A @ f.A.T, torch.eye(5), atol=1e-5)


def test_hosvd_factors_are_the_leading_singular_subspaces():
    torch.manual_seed(0)
    D = torch.randn(8, 6, 5)
    f = hosvd(D, 3, 2)
    U = torch.linalg.svd(unfold(D, 0), full_matrices=False)[0][:, :3]
    V = torch.linalg.svd(unfold(D, 1), full_matrices=False)[0][:, :2]
    assert torch.allclose(f.B @ f.B.T, U @ U.T, atol=1e-5)  # same subspace
    assert torch.allclose(f.A.T @ f.A, V @ V.T, atol=1e-5)
    assert torch.allclose(f.cores[0], project_core(D, f.B, f.A))


def test_block_hooi_never_increases_the_error_and_recovers_block_terms():
    torch.manual_seed(1)
    d, h, m, r, K = 10, 9, 6, 2, 2
    D = sum(
        tucker_to_tensor(
            torch.linalg.qr(torch.randn(d, r))[0],
            torch.linalg.qr(torch.randn(h, r))[0].T,
            torch.randn(r, r, m),
        )
        for _ in range(K)
    )
    f = hosvd(D, r, r, K, sweeps=0, init="blocks")
    errors = [float(((D - groups_to_tensor(f)) ** 2).sum())]
    for _ in range(40):
        f, err = hooi_sweep(D, f)
        errors.append(err)
    assert all(b <= a * (1 + 1e-5) + 1e-10 for a, b in zip(errors, errors[1:], strict=False))
    assert errors[0] > 1e-2 * float((D * D).sum())  # consecutive HOSVD blocks alone are far off
    assert rel(groups_to_tensor(hosvd(D, r, r, K, sweeps=None)), D) < 1e-3  # default sweeps fix it


# --- conversion round trips -----------------------------------------------------------------


def test_full_rank_lorsa_conversion_reproduces_every_generator():
    cfg = AdaMixerConfig.tiny()
    model = trained_like(cfg)
    before = [(g.weight.detach().clone(), g.bias.detach().clone()) for g in generators(model)]
    feats = random_inputs(cfg, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(*feats)["cls_score"][-1]
    lors, report = convert(model, rank=None, include=[GEN], adaptive="auto", require_savings=False)
    assert all(isinstance(g, LorsaLinear) for g in generators(lors))
    (matrix,) = report.stacks[0].matrices
    assert matrix.kind == "adaptive" and matrix.layer == "generator"
    assert max(matrix.relative_error) < 1e-5
    with torch.no_grad():
        assert (lors(*feats)["cls_score"][-1] - ref).abs().max() < 1e-4
    dense = merge(lors)
    for g, (w, b) in zip(generators(dense), before, strict=False):
        assert type(g) is nn.Linear
        assert rel(g.weight, w) < 1e-5 and rel(g.bias, b) < 1e-5
        assert (g.weight - w).abs().max() <= 1e-5 * w.abs().max()


@pytest.mark.parametrize("spec", ["auto", f"{GEN}: 2 x [16x16, 8x4]"])
def test_low_rank_converted_outputs_equal_merged_dense_outputs(spec):
    cfg = AdaMixerConfig.tiny()
    model = trained_like(cfg, seed=1)
    params_before = count_parameters(model)
    hook = make_adaptive_hook(spec, 2, [1, 1, 2, 2, 3, 3])
    projected = plan_conversion(
        copy.deepcopy(model), 2, [1, 1, 2, 2, 3, 3], [GEN, OUT], None, True, adaptive=hook
    ).report(params_before)
    lors, report = convert(model, rank=2, groups=[1, 1, 2, 2, 3, 3], include=[GEN, OUT], adaptive=spec)
    assert {m.kind for m in report.stacks[0].matrices} == {"adaptive", "static"}
    assert projected.params_after == report.params_after == count_parameters(lors) < params_before
    feats = random_inputs(cfg, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = lors(*feats)
        dense = merge(copy.deepcopy(lors))
        ref = dense(*feats)
    assert not any(isinstance(m, LorsaLinear) for m in dense.modules())
    for key in ("cls_score", "xyzr", "query"):
        for a, b in zip(out[key], ref[key], strict=False):
            assert (a - b).abs().max() <= 1e-4 * max(1.0, float(b.abs().max()))
    # the generated matrices themselves, per stage
    q = torch.randn(7, cfg.content_dim)
    with torch.no_grad():
        for g, d in zip(generators(lors), generators(dense), strict=False):
            assert rel(g(q), d(q)) < 1e-5


def test_merge_state_is_the_pure_form_of_to_dense():
    cfg = AdaMixerConfig.tiny()
    model = trained_like(cfg, seed=2)
    lors, _ = convert(model, rank=3, groups=[1, 2, 1, 2, 3, 1], include=[GEN], adaptive="auto")
    for gen in generators(lors):
        with torch.no_grad():  # non-trivial E and B, A
            for p in gen.parameters():
                p.add_(0.01 * torch.randn_like(p))
        state = {k: v.detach().clone() for k, v in gen.state_dict().items()}
        assert set(state) >= {"shared", "lors_B.0", "lors_A.1", "lors_E.0.weight", "lors_E.1.bias"}
        meta = {
            "shape": [gen.out_features, gen.in_features],
            "dtype": "float32",
            "kind": "adaptive",
            "layer_kind": "generator",
            "rank": 3,
            "extra": {"layout": str(gen.layout), "has_bias": True},
        }
        merged = layer_class("generator").merge_state(state, meta)
        dense = gen.to_dense()
        assert set(merged) == {"weight", "bias"}
        assert torch.allclose(merged["weight"], dense.weight, atol=1e-6)
        assert torch.allclose(merged["bias"], dense.bias, atol=1e-6)
        assert torch.allclose(gen.weight, dense.weight, atol=1e-6)  # .weight/.bias read the merge
        assert torch.allclose(gen.bias, dense.bias, atol=1e-6)
        q = torch.randn(5, cfg.content_dim)
        with torch.no_grad():
            assert rel(gen(q), dense(q)) < 1e-5


def test_merge_state_writes_the_source_dtype():
    lin = nn.Linear(4, 2 * 3 * 3).to(torch.bfloat16)
    gen = LorsaLinear(
        lin, nn.Parameter(torch.randn(18, 5, dtype=torch.bfloat16)), rank=2, groups=1, layout="2 x [3x3]"
    )
    out = LorsaLinear.merge_state(dict(gen.state_dict()), {"dtype": "bfloat16", "layout": "2 x [3x3]"})
    assert out["weight"].dtype == torch.bfloat16 and out["weight"].shape == (18, 4)


# --- structured generators ------------------------------------------------------------------


def structured_decoder(cfg, r, groups, noise, seed=0):
    """Generators = common + per-stage block-term deltas (K_i groups of rank (r, r)) + noise.

    Stages come in pairs with opposite deltas, so the deltas average to zero and the mean
    generator is the common one (LORS's premise: shared = mean). Returns the model and, per
    stage, the noise-free generator ``(out, dq+1)``.
    """
    model = trained_like(cfg, seed)
    g = torch.Generator().manual_seed(seed)
    gens = generators(model)
    dq = cfg.content_dim
    lay = Layout.parse(cfg.generator_layout)
    common = [torch.randn(lay.groups, R, C, dq + 1, generator=g) / math.sqrt(dq) for R, C in lay.entries]
    clean = []
    delta = None
    for i, gen in enumerate(gens):
        if i % 2 == 0:
            delta = []
            for R, C in lay.entries:
                d = torch.zeros(lay.groups, R, C, dq + 1)
                for gi in range(lay.groups):
                    for _ in range(groups[i]):
                        B = torch.linalg.qr(torch.randn(R, r, generator=g))[0]
                        A = torch.linalg.qr(torch.randn(C, r, generator=g))[0].T
                        core = torch.randn(r, r, dq + 1, generator=g) * 1.5 / math.sqrt(dq)
                        d[gi] += tucker_to_tensor(B, A, core)
                delta.append(d)
            sign = 1.0
        else:
            sign = -1.0
        T = lay.join([c + sign * d for c, d in zip(common, delta, strict=False)])  # (out, dq+1)
        clean.append(T)
        noisy = T + noise * T.std() * torch.randn(T.shape, generator=g)
        with torch.no_grad():
            gen.weight.copy_(noisy[:, :dq])
            gen.bias.copy_(noisy[:, dq])
    return model, clean


def test_true_rank_conversion_recovers_generated_matrices_at_noise_level():
    cfg = AdaMixerConfig.tiny(in_points=8)  # S is 8x8 so that K*r = 6 fits
    groups, r, noise = [1, 1, 2, 2, 3, 3], 2, 1e-3
    model, clean = structured_decoder(cfg, r, groups, noise)
    dense_gens = copy.deepcopy(generators(model))
    lors, report = convert(model, rank=r, groups=groups, include=[GEN], adaptive="auto")
    q = torch.randn(64, cfg.content_dim, generator=torch.Generator().manual_seed(9))
    q1 = torch.cat([q, torch.ones(64, 1)], dim=1)
    lay = Layout.parse(cfg.generator_layout)
    for i, (gen, dense, T) in enumerate(zip(generators(lors), dense_gens, clean, strict=False)):
        with torch.no_grad():
            truth = q1 @ T.T  # (64, out): every M(q), S(q) of every group, noise-free
            noisy = dense(q)
            got = gen(q)
        noise_level = rel(noisy, truth)
        assert 2e-4 < noise_level < 5e-3
        for part_got, part_truth in zip(
            lay.split(got.T), lay.split(truth.T), strict=False
        ):  # M and S separately
            assert rel(part_got, part_truth) < 2 * noise_level, i
        assert rel(got, truth) < 1.5 * noise_level, i
    assert max(report.stacks[0].matrices[0].relative_error) < 5e-3


def test_hosvd_init_beats_random_init_of_the_same_shape():
    """Residuals of a structured decoder (noise 1e-2): HOSVD init against random orthonormal factors
    of the same shapes with their best (projected) cores; then the default refinement."""
    cfg = AdaMixerConfig.tiny(in_points=8)
    groups, r = [1, 1, 2, 2, 3, 3], 2
    model, _ = structured_decoder(cfg, r, groups, noise=1e-2, seed=5)
    lay = Layout.parse(cfg.generator_layout)
    per_layer = [generator_tensors(g.weight.detach(), g.bias.detach(), lay) for g in generators(model)]
    gen = torch.Generator().manual_seed(0)
    for e in range(len(lay.entries)):
        T = torch.stack([layer[e][0] for layer in per_layer])  # group 0 of entry e: (N, R, C, m)
        T_s = T.mean(0)
        for i, K in enumerate(groups):
            D = T[i] - T_s
            init = rel(groups_to_tensor(hosvd(D, r, r, K, sweeps=0)), D)  # HOSVD init, no block sweeps
            blocks = rel(groups_to_tensor(hosvd(D, r, r, K, sweeps=0, init="blocks")), D)
            final = rel(groups_to_tensor(hosvd(D, r, r, K, sweeps=None)), D)  # what convert does
            R, C, _ = D.shape
            rnd = []
            for _ in range(3):
                B = torch.linalg.qr(torch.randn(R, K * r, generator=gen))[0]
                A = torch.linalg.qr(torch.randn(C, K * r, generator=gen))[0].T
                approx = sum(
                    tucker_to_tensor(
                        B[:, k * r : (k + 1) * r],
                        A[k * r : (k + 1) * r],
                        project_core(D, B[:, k * r : (k + 1) * r], A[k * r : (k + 1) * r]),
                    )
                    for k in range(K)
                )
                rnd.append(rel(approx, D))
            assert min(rnd) > 0.85
            if K == 1:
                assert init < 0.06 * min(rnd), (e, i, init, min(rnd))
            else:
                assert init < 0.45 * min(rnd), (e, i, init, min(rnd))  # greedy deflation init
                assert init < blocks  # consecutive HOSVD blocks are the weaker init for K > 1
            assert final < 0.06 * min(rnd), (e, i, final, min(rnd))


# --- training from the paper's init ---------------------------------------------------------


def test_paper_init_lorsa_model_trains_a_step():
    cfg = AdaMixerConfig.tiny()
    torch.manual_seed(0)
    model = AdaMixerDecoder(cfg)
    model.init_weights()
    spec = GeneratorSpec(pattern=GEN, rank=4, groups=[1, 1, 2, 2, 3, 3])
    lors, _ = convert(model, rank=2, include=[GEN, OUT], adaptive=[spec], init="paper")
    gens = generators(lors)
    assert all(isinstance(g, LorsaLinear) for g in gens)
    assert len({id(g.shared) for g in gens}) == 1  # one shared generator
    assert all(float(E.weight.detach().abs().sum()) == 0 for g in gens for E in g.lors_E)  # zero E
    assert all(float(B.detach().abs().sum()) > 0 for g in gens for B in g.lors_B)  # Kaiming B, A
    assert gens[5].lors_B[0].shape == (2, 16, 3 * 4) and gens[5].lors_A[1].shape == (2, 3 * 4, 4)
    lors.train()
    feats, xyzr, content = random_inputs(cfg, generator=torch.Generator().manual_seed(1))
    target = torch.randn(2, 5, cfg.num_classes, generator=torch.Generator().manual_seed(2))

    def loss_fn():
        out = lors(feats, xyzr, content)
        return sum(((c - target) ** 2).mean() for c in out["cls_score"])

    opt = torch.optim.SGD([p for p in lors.parameters() if p.requires_grad], lr=1e-2)
    loss0 = loss_fn()
    opt.zero_grad()
    loss0.backward()
    assert all(float(E.weight.grad.abs().sum()) > 0 for g in gens for E in g.lors_E)  # a missing grad raises
    shared_grad = gens[0].shared.grad
    assert torch.isfinite(shared_grad).all() and float(shared_grad.abs().sum()) > 0
    opt.step()
    with torch.no_grad():
        loss1 = loss_fn()
    assert torch.isfinite(loss1) and loss1 < loss0


# --- specs ------------------------------------------------------------------------------------


def test_spec_that_matches_nothing_is_an_error():
    model = trained_like(AdaMixerConfig.tiny())
    with pytest.raises(LorsUsageError, match="matches no"):
        convert(model, rank=2, include=[GEN, OUT], adaptive=["*no_such_generator*: 2 x [16x16, 8x4]"])


def test_spec_layout_must_fit_the_linear():
    model = trained_like(AdaMixerConfig.tiny())
    with pytest.raises(LorsUsageError, match="outputs"):
        convert(model, rank=2, include=[GEN], adaptive=[f"{GEN}: 2 x [16x16, 8x8]"])


def test_spec_string_parsing():
    s = GeneratorSpec.parse("*gen*.weight: 4 x [64x64, 128x32]")
    assert s.pattern == "*gen*.weight" and Layout.parse(s.layout).entries == ((64, 64), (128, 32))
    assert GeneratorSpec.parse("auto").auto_layout
    assert GeneratorSpec.parse("*gen*: auto").auto_layout
    with pytest.raises(LorsUsageError):
        GeneratorSpec.parse("*gen* 4 x [64x64]")


class Block(nn.Module):
    """A block whose forward does not trace: its generator needs an explicit spec."""

    def __init__(self, dq=6, e=3):
        super().__init__()
        self.e = e
        self.gen = nn.Linear(dq, 2 * e * e)
        self.proj = nn.Linear(2 * e, dq)

    def forward(self, q):  # (B, dq)
        if q.shape[-1] < 1:  # data-dependent control flow: torch.fx cannot trace this
            raise ValueError
        M = self.gen(q).reshape(q.shape[0], 2, self.e, self.e)
        x = torch.ones(q.shape[0], 2, 1, self.e)
        return q + self.proj((x @ M).flatten(1))


def test_untraceable_generator_is_converted_with_an_explicit_spec():
    torch.manual_seed(0)
    model = nn.Sequential(*[Block() for _ in range(4)])
    q = torch.randn(3, 6)
    with torch.no_grad():
        ref = model(q)
    with pytest.raises(LorsUsageError, match="give the layout"):
        convert(copy.deepcopy(model), rank=1, include=["*.gen.weight"], adaptive=["*.gen.weight: auto"])
    lors, report = convert(
        model,
        rank=None,
        include=["*.gen.weight"],
        adaptive=["*.gen.weight: 2 x [3x3]"],
        require_savings=False,
    )
    assert all(isinstance(b.gen, LorsaLinear) for b in lors)
    with torch.no_grad():
        assert (lors(q) - ref).abs().max() < 1e-5


# --- the layer itself, over layouts, ranks and bias ------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(
    groups=st.integers(1, 3),
    entries=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=3),
    dq=st.integers(1, 6),
    rank=st.one_of(st.none(), st.integers(1, 4)),
    K=st.integers(1, 3),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_lorsa_linear_forward_merge_state_and_to_dense_agree(groups, entries, dq, rank, K, bias, seed):
    torch.manual_seed(seed)
    layout = Layout(groups=groups, entries=tuple(entries))
    dense = nn.Linear(dq, layout.out_features, bias=bias)
    shared = nn.Parameter(torch.randn(layout.out_features, dq + int(bias)))
    layer = LorsaLinear(dense, shared, rank=rank, groups=K, layout=str(layout))
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p))
    q = torch.randn(2, 3, dq)
    merged = LorsaLinear.merge_state(
        {k: v.detach() for k, v in layer.state_dict().items()},
        {"dtype": "float32", "extra": {"layout": str(layout), "has_bias": bias}},
    )
    back = layer.to_dense()
    assert type(back) is nn.Linear and (back.bias is None) == (not bias)
    assert torch.allclose(merged["weight"], back.weight, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(layer(q), back(q), atol=1e-4, rtol=1e-4)
    n_private = sum(p.numel() for n, p in layer.named_parameters() if n != "shared")
    from lors_convert.layers.adaptive import private_param_count

    assert n_private == private_param_count(layout, dq, rank, K, bias)


class BiasFreeBlock(nn.Module):
    def __init__(self, dq=6, e=4):
        super().__init__()
        self.e = e
        self.gen = nn.Linear(dq, 3 * e * e, bias=False)

    def forward(self, q):  # (B, dq)
        M = self.gen(q).unflatten(-1, (3, self.e, self.e))  # (B, 3, e, e)
        x = q[:, None, None, : self.e].expand(-1, 3, 1, -1)  # (B, 3, 1, e)
        return q + (x @ M).sum((1, 2)).repeat(1, 2)[:, : q.shape[1]]


def test_bias_free_generators_convert_and_merge():
    torch.manual_seed(0)
    model = nn.Sequential(*[BiasFreeBlock() for _ in range(3)])
    q = torch.randn(5, 6)
    lors, report = convert(model, rank=1, groups=[1, 2, 1], include=["*.gen.weight"], adaptive="auto")
    gens = [b.gen for b in lors]
    assert all(isinstance(g, LorsaLinear) and not g.has_bias for g in gens)
    assert gens[0].shared.shape == (48, 6) and str(gens[0].layout) == "3 x [4x4]"
    with torch.no_grad():
        out = lors(q)
        ref = merge(copy.deepcopy(lors))(q)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert report.params_after == count_parameters(lors)
