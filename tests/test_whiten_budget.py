"""Calibrated LORS math: whitened SVD identity, weighted shared part, refinement, rank budget."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lors_convert.decompose.budget import BudgetItem, allocate_ranks, evaluate, uniform_ranks
from lors_convert.decompose.weighted import decompose_weighted, truncated, weighted_basis
from lors_convert.decompose.whiten import weighted_shared
from lors_convert.decompose.whitener import (
    CholeskyWhitener,
    EigenWhitener,
    ScaledGram,
    cached_cholesky,
    cached_eigh,
    identity_whitener,
    stack_whiteners,
    whitener,
)
from lors_convert.errors import LorsUsageError


def _gram(n: int, gen: torch.Generator, rank: int | None = None) -> torch.Tensor:
    X = torch.randn(rank or 3 * n, n, generator=gen, dtype=torch.float64)
    X = X * torch.logspace(0, -2, n, dtype=torch.float64)  # anisotropic inputs, like real activations
    return X.T @ X


def _stack(N: int, d: int, h: int, gen: torch.Generator) -> list[torch.Tensor]:
    base = torch.randn(d, h, generator=gen, dtype=torch.float64)
    return [base + 0.5 * torch.randn(d, h, generator=gen, dtype=torch.float64) for _ in range(N)]


def _weighted_error(W: torch.Tensor, What: torch.Tensor, C: torch.Tensor) -> float:
    D = W - What
    return float(torch.trace(D @ C @ D.T))


@pytest.mark.parametrize("orientation", ["out_in", "in_out"])
def test_whitened_svd_error_equals_discarded_energy(orientation):
    gen = torch.Generator().manual_seed(0)
    N, out, inp = 4, 12, 9
    Ws = _stack(N, out, inp, gen)  # linear orientation (out, in)
    grams = [_gram(inp, gen) for _ in range(N)]
    stored = Ws if orientation == "out_in" else [W.T.contiguous() for W in Ws]
    ranks = [1, 2, 3, 4]
    f = decompose_weighted(stored, ranks, grams, orientation=orientation, floor=0.0)
    for i, layer in enumerate(f.layers):
        merged = f.shared.double() + layer.B.double() @ layer.A.double()
        if orientation == "in_out":
            merged = merged.T  # stored (in, out) -> linear orientation
        assert layer.B.shape[1] == ranks[i] and layer.A.shape[0] == ranks[i]
        direct = _weighted_error(Ws[i], merged, grams[i])
        assert direct == pytest.approx(f.weighted_error[i], rel=1e-4)
        # ... and it is the discarded tail of the whitened residual spectrum
        L = whitener(grams[i], floor=0.0).L
        shared = f.shared.double() if orientation == "out_in" else f.shared.double().T
        s = torch.linalg.svdvals((Ws[i] - shared) @ L)
        assert float((s[ranks[i] :] ** 2).sum()) == pytest.approx(direct, rel=1e-4)


@pytest.mark.parametrize("orientation", ["out_in", "in_out"])
def test_a_basis_kept_at_its_ranks_fits_as_the_full_svd_in_less_memory(orientation):
    """A single conversion knows its ranks: each layer keeps its leading vectors only, found from the
    whitened residual's Gram (float64: exact to rounding), and every singular value; the factors and
    errors are those of the full SVD truncated, to 1e-10 relative."""
    gen = torch.Generator().manual_seed(3)
    N, out, inp = 4, 14, 10
    stored = [W if orientation == "out_in" else W.T.contiguous() for W in _stack(N, out, inp, gen)]
    grams = [_gram(inp, gen) for _ in range(N)]
    ranks = [0, 2, 3, 20]  # 20: more than the spectrum's 10 values
    full = weighted_basis(stored, grams, orientation)
    kept = weighted_basis(stored, grams, orientation, keep=ranks)
    for (_, S_full, _), (_, S_kept, _) in zip(full.svds, kept.svds, strict=True):
        torch.testing.assert_close(S_kept, S_full, rtol=1e-10, atol=1e-10 * float(S_full[0]))
    a, b = truncated(full, ranks), truncated(kept, ranks)
    assert torch.equal(a.shared, b.shared)
    assert b.weighted_error == pytest.approx(a.weighted_error, rel=1e-10, abs=1e-10)
    for x, y in zip(a.layers, b.layers, strict=True):
        torch.testing.assert_close((y.B @ y.A).double(), (x.B @ x.A).double(), rtol=0, atol=1e-5)
    svd_bytes = [sum(t.nbytes for t in svd) for svd in kept.svds]
    assert svd_bytes == [8 * (min(k, 10) * (out + inp) + 10) for k in ranks]
    assert kept.nbytes < full.nbytes


@pytest.mark.parametrize("orientation", ["out_in", "in_out"])
def test_a_stack_is_read_in_its_stored_dtype_and_fits_as_if_widened_first(orientation):
    """The fit widens one layer at a time from the stored tensors: the basis holds no float64 copy
    of the stack, and the factors (with output Grams and refinement sweeps) are bit-identical to a
    fit of the same layers widened to float64 beforehand."""
    gen = torch.Generator().manual_seed(5)
    N, out, inp = 3, 12, 8
    linear = [W.to(torch.bfloat16) for W in _stack(N, out, inp, gen)]
    stored = [W if orientation == "out_in" else W.T.contiguous() for W in linear]
    grams = [_gram(inp, gen) for _ in range(N)]
    out_grams = [_gram(out, gen) for _ in range(N)]
    basis = weighted_basis(stored, grams, orientation, out_grams=out_grams, keep=[2, 2, 2])
    assert all(a is b for a, b in zip(basis.W.weights, stored, strict=True))  # the source's tensors
    assert basis.nbytes == basis.W_s.nbytes + sum(t.nbytes for svd in basis.svds for t in svd)
    kwargs = dict(orientation=orientation, out_grams=out_grams, refine=2)
    a = decompose_weighted(stored, [1, 2, 3], grams, **kwargs)
    b = decompose_weighted([W.double() for W in stored], [1, 2, 3], grams, **kwargs)
    assert torch.equal(a.shared, b.shared) and a.history == b.history
    for x, y in zip(a.layers, b.layers, strict=True):
        assert torch.equal(x.B, y.B) and torch.equal(x.A, y.A)


def test_whitened_truncation_beats_plain_svd_on_weighted_error():
    gen = torch.Generator().manual_seed(1)
    Ws = _stack(3, 10, 8, gen)
    grams = [_gram(8, gen) for _ in range(3)]
    weighted = decompose_weighted(Ws, [2, 2, 2], grams, floor=0.0)
    plain = decompose_weighted(Ws, [2, 2, 2], None, shared=weighted.shared)
    for i in range(3):
        e_w = _weighted_error(
            Ws[i],
            weighted.shared.double() + weighted.layers[i].B.double() @ weighted.layers[i].A.double(),
            grams[i],
        )
        e_p = _weighted_error(
            Ws[i], plain.shared.double() + plain.layers[i].B.double() @ plain.layers[i].A.double(), grams[i]
        )
        assert e_w <= e_p * (1 + 1e-6)


def test_weighted_shared_is_the_least_squares_optimum():
    gen = torch.Generator().manual_seed(2)
    W = torch.stack(_stack(3, 6, 5, gen))
    grams = [_gram(5, gen) for _ in range(3)]
    S = weighted_shared(W, grams)

    def objective(S):
        return sum(_weighted_error(W[i], S, grams[i]) for i in range(3))

    best = objective(S)
    for _ in range(5):
        assert objective(S + 1e-3 * torch.randn(S.shape, generator=gen, dtype=torch.float64)) > best
    # with identity Grams it is the plain mean
    eye = [torch.eye(5, dtype=torch.float64)] * 3
    assert torch.allclose(weighted_shared(W, eye), W.mean(0))


def test_singular_gram_is_floored_not_cholesky():
    gen = torch.Generator().manual_seed(3)
    Ws = _stack(3, 6, 8, gen)
    grams = [_gram(8, gen, rank=3) for _ in range(3)]  # rank 3 < 8: singular
    f = decompose_weighted(Ws, [2, 2, 2], grams, refine=2)
    assert all(torch.isfinite(layer.A).all() and torch.isfinite(layer.B).all() for layer in f.layers)
    assert torch.isfinite(f.shared).all()
    zero = decompose_weighted(Ws, [2, 2, 2], [torch.zeros(8, 8, dtype=torch.float64)] * 3)  # unreached layers
    assert torch.isfinite(zero.shared).all()


# the conversion's ridge (the floor cannot bind: Cholesky), and a floor the ridge leaves in play (eigenbasis)
WHITENERS = [(1e-6, 0.1, CholeskyWhitener), (0.05, 0.1, EigenWhitener)]


@pytest.mark.parametrize("floor, damp, kind", WHITENERS)
@pytest.mark.parametrize("rank", [None, 3])  # full-rank and singular (floored) Grams
def test_whitener_operators_equal_the_dense_square_root(rank, floor, damp, kind):
    gen = torch.Generator().manual_seed(4)
    C = _gram(8, gen, rank=rank)
    before = C.clone()
    w = whitener(C, floor=floor, damp=damp)
    assert isinstance(w, kind)
    L, L_inv, Ce = w.L, w.L_inv, w.gram()
    assert torch.allclose(L @ L.T, Ce, rtol=1e-10, atol=1e-12 * float(Ce.abs().max()))
    assert torch.allclose(L_inv @ L, torch.eye(8, dtype=torch.float64), atol=1e-9)
    # the effective Gram: eigenvalues + damp * mean, floored at floor * max
    lam = torch.linalg.eigvalsh(C).clamp_min(0.0)
    lam = lam + damp * float(lam.mean())
    lam = lam.clamp_min(floor * float(lam.max()))
    assert torch.allclose(torch.linalg.eigvalsh(Ce), lam, rtol=1e-9, atol=1e-12 * float(lam.max()))
    R = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    A = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    tol = dict(rtol=1e-10, atol=1e-10)
    assert torch.allclose(w.right_L(R), R @ L, **tol)
    assert torch.allclose(w.left_LT(R.T), L.T @ R.T, **tol)
    assert torch.allclose(w.right_L_inv(A), A @ L_inv, **tol)
    assert torch.allclose(w.left_L_inv_T(A.T), L_inv.T @ A.T, **tol)
    assert torch.allclose(w.times(R.T), Ce @ R.T, **tol)
    assert torch.allclose(w.times_right(R), R @ Ce, **tol)
    assert torch.allclose(w.solve_right(R), torch.linalg.solve(Ce, R.T).T, rtol=1e-8, atol=1e-8)
    assert torch.allclose(w.right_L_inv_T(R), R @ L_inv.T, **tol)
    assert torch.allclose(w.right_L_inv_T(R), w.right_L(w.solve_right(R)), rtol=1e-8, atol=1e-8)
    eye = identity_whitener(8)
    assert (
        eye.Q is None
        and torch.equal(eye.right_L(R), R)
        and torch.equal(eye.right_L_inv_T(R), R)
        and torch.equal(eye.gram(), torch.eye(8, dtype=torch.float64))
    )
    total = torch.randn(8, 8, generator=gen, dtype=torch.float64)
    expected = total + 2.0 * Ce
    assert w.gram(plus=total, weight=2.0) is total and torch.allclose(total, expected, rtol=1e-12, atol=1e-12)
    before_total = total.clone()
    assert eye.gram(plus=total) is total and torch.equal(
        total, before_total + torch.eye(8, dtype=torch.float64)
    )
    assert torch.equal(C, before)  # the Gram is read, never scaled or shifted in place
    again = whitener(C, floor=floor, damp=damp)
    if kind is CholeskyWhitener:
        assert again.L0 is w.L0  # the cached factor
    else:
        assert again.Q is w.Q  # the cached basis


@pytest.mark.parametrize("floor, damp, kind", WHITENERS)
def test_whiteners_hold_the_cached_root_not_copies(floor, damp, kind):
    """Memory: one square root per distinct Gram, however many matrices (q/k/v) read it."""
    gen = torch.Generator().manual_seed(5)
    C = _gram(6, gen)
    wh = stack_whiteners([ScaledGram(C), ScaledGram(C, 2.0)], 2, 6, floor, damp, "cpu")
    if kind is CholeskyWhitener:
        L0 = cached_cholesky(C, damp)
        assert wh[0].L0 is L0 and wh[1].L0 is L0 and wh[0].C is C
    else:
        Q = cached_eigh(C)[1]
        assert wh[0].Q is Q and wh[1].Q is Q
    assert torch.allclose(wh[1].gram(), 2.0 * wh[0].gram(), rtol=1e-12)


def test_cache_entries_die_with_their_gram():
    from lors_convert.decompose.whitener import _CACHE

    C = _gram(5, torch.Generator().manual_seed(6))
    lam, Q = cached_eigh(C)
    L0 = cached_cholesky(C, 0.1)
    assert cached_eigh(C)[1] is Q and cached_cholesky(C, 0.1) is L0  # hits: the same tensors
    assert cached_cholesky(C, 0.2) is not L0  # another ridge, another factor
    keys = [(id(C), "eigh", 0.0), (id(C), "cholesky", 0.1), (id(C), "cholesky", 0.2)]
    assert all(key in _CACHE for key in keys)
    del C
    assert not any(key in _CACHE for key in keys)


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    N=st.integers(2, 4),
    k=st.integers(0, 4),
    orientation=st.sampled_from(["out_in", "in_out"]),
)
def test_refinement_never_increases_weighted_error(seed, N, k, orientation):
    gen = torch.Generator().manual_seed(seed)
    Ws = _stack(N, 7, 6, gen)  # (out, in) = (7, 6)
    grams = [_gram(6, gen, rank=5) for _ in range(N)]  # singular: the floor is in play
    stored = Ws if orientation == "out_in" else [W.T.contiguous() for W in Ws]
    f = decompose_weighted(stored, [k] * N, grams, orientation=orientation, refine=4)
    h = f.history
    assert len(h) == 5
    assert all(b <= a * (1 + 1e-9) + 1e-12 for a, b in zip(h, h[1:], strict=False)), h
    assert h[-1] == pytest.approx(f.total_weighted_error, rel=1e-9, abs=1e-12)


# ---------------------------------------------------------------- budget


def _decaying_items(gen: torch.Generator) -> list[BudgetItem]:
    items = []
    for d, h, decay in [(64, 64, 0.95), (64, 256, 0.99), (256, 64, 0.9), (64, 64, 0.999)]:
        m = min(d, h)
        spectra = []
        for _ in range(6):
            scale = float(torch.rand(1, generator=gen)) * 4 + 0.1
            spectra.append([scale * decay**j for j in range(m)])
        items.append(BudgetItem(d=d, h=h, spectra=spectra))
    return items


@pytest.mark.parametrize("fraction", [0.3, 0.45, 0.6, 0.9])
def test_budget_is_met_within_one_percent(fraction):
    items = _decaying_items(torch.Generator().manual_seed(4))
    alloc = allocate_ranks(items, fraction)
    assert alloc.params <= alloc.budget
    assert abs(alloc.fraction - fraction) <= 0.01 * fraction
    for item, ranks, dense in zip(items, alloc.ranks, alloc.dense, strict=False):
        if not dense:
            assert item.lors_cost(ranks) < item.dense_cost  # every converted matrix breaks even


def test_budget_beats_uniform_rank_at_equal_params():
    items = _decaying_items(torch.Generator().manual_seed(5))
    for r in (4, 8, 16, 24):
        uniform = uniform_ranks(items, r)
        greedy = allocate_ranks(items, uniform.params, fraction=False)
        assert greedy.params <= uniform.params
        assert greedy.error < uniform.error


def test_budget_keeps_non_breaking_matrices_dense():
    flat = BudgetItem(d=8, h=8, spectra=[[1.0] * 8, [1.0] * 8])  # flat spectra: low rank never pays
    steep = BudgetItem(d=64, h=64, spectra=[[0.5**j for j in range(64)]] * 2)
    alloc = allocate_ranks([flat, steep], 0.9)
    assert alloc.dense[0] and not alloc.dense[1]
    assert evaluate([flat, steep], alloc.ranks, alloc.dense).params == alloc.params


def test_budget_below_shared_cost_is_a_usage_error():
    item = BudgetItem(d=16, h=16, spectra=[[1.0] * 16] * 4)  # shared part alone is 1/4
    with pytest.raises(LorsUsageError, match="shared parts alone"):
        allocate_ranks([item], 0.2)


def test_unshared_items_cost_only_their_factors():
    item = BudgetItem(d=10, h=6, spectra=[[1.0, 0.5]], shared=False)
    assert item.lors_cost([2]) == 2 * 16 and item.dense_cost == 60
    assert math.isclose(item.error([1]), 0.5)


def test_cholesky_and_eigen_roots_give_the_same_fit(monkeypatch):
    """Any square root of the effective Gram gives the same whitened spectra and the same factors'
    products: the conversion's Cholesky roots against eigenbases of the same Grams."""
    import lors_convert.decompose.whitener as whitener_module

    gen = torch.Generator().manual_seed(7)
    Ws = _stack(4, 9, 7, gen)
    C = [_gram(7, gen, rank=5) for _ in range(4)]  # singular: only the ridge makes them definite
    G = [_gram(9, gen) for _ in range(4)]
    ranks = [1, 2, 3, 2]
    fits = []
    for cholesky in (True, False):
        if not cholesky:
            monkeypatch.setattr(whitener_module, "cholesky_qualifies", lambda n, floor, damp: False)
        f = decompose_weighted(Ws, ranks, C, out_grams=G, floor=1e-6, damp=0.1, refine=2)
        fits.append(f)
    one, two = fits
    assert one.history == pytest.approx(two.history, rel=1e-9)
    assert torch.allclose(one.shared, two.shared, rtol=1e-5, atol=1e-6)
    for a, b in zip(one.layers, two.layers, strict=True):
        assert torch.allclose(a.B @ a.A, b.B @ b.A, rtol=1e-4, atol=1e-5)
