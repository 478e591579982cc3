"""Output-aware calibration: output-gradient Grams (K-FAC left factor), two-sided whitened math,
the shared-part solve, the budget in one unit, and the ``--objective`` option end to end."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lors_convert import convert
from lors_convert.calibrate.fidelity import fidelity, reference_outputs
from lors_convert.calibrate.grams import collect_grams, gram_owners
from lors_convert.calibrate.sensitivity import collect_output_grams
from lors_convert.decompose.budget import BudgetItem, allocate_ranks
from lors_convert.decompose.lorst import rebalance
from lors_convert.decompose.weighted import decompose_weighted
from lors_convert.decompose.whiten import (
    shared_and_spectra,
    weighted_shared,
    whitened_spectra,
)
from lors_convert.decompose.whitener import whitener
from lors_convert.errors import LorsUsageError
from tests.models import ConvStack, LinStack, bert


def test_output_grams_estimate_jacobian_gram():
    torch.manual_seed(0)
    model = LinStack()
    x = torch.randn(64, 8, 6)  # 64 samples of 8 rows
    batches = list(x.split(16))
    owners = gram_owners(model)
    G = collect_output_grams(model, owners, batches, probes=64, seed=0)
    W = [model.blocks[i].lin.weight.detach().double() for i in range(3)]
    expected = {
        "blocks.2.lin.weight": torch.eye(6, dtype=torch.float64),  # the output itself
        "blocks.1.lin.weight": W[2].T @ W[2],
        "blocks.0.lin.weight": (W[2] @ W[1]).T @ (W[2] @ W[1]),
    }
    for key, P in expected.items():
        exact = 8 * P  # summed over a sample's 8 rows, averaged over samples and probes
        rel = float(torch.linalg.matrix_norm(G[key] - exact) / torch.linalg.matrix_norm(exact))
        assert rel < 0.05, (key, rel)  # 32,768 probe draws: ~1% statistical error
    # deterministic for a seed, and nothing left behind on the model
    again = collect_output_grams(model, owners, batches, probes=64, seed=0)
    assert all(torch.equal(G[k], again[k]) for k in G)
    assert all(p.grad is None for p in model.parameters())


class LinStackHead(LinStack):
    """A linear stack and a wider linear head outside it (a causal LM's logits, in miniature)."""

    def __init__(self, n=3, d=6, vocab=40):
        super().__init__(n, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, x):
        return self.head(super().forward(x))


def test_output_grams_probed_at_the_head_input_estimate_the_same_jacobian_gram(monkeypatch):
    from lors_convert.calibrate import sensitivity

    torch.manual_seed(0)
    model = LinStackHead()
    batches = list(torch.randn(64, 8, 6).split(16))
    owners = gram_owners(model)
    assert "head.weight" not in owners
    drawn = []
    probe = sensitivity._probe
    monkeypatch.setattr(
        sensitivity, "_probe", lambda y, mask, g: drawn.append(y.shape[-1]) or probe(y, mask, g)
    )
    G = collect_output_grams(model, owners, batches, probes=64, seed=0)
    assert set(drawn) == {6}  # every probe drawn over the head's 6 inputs, none over its 40 outputs
    H = model.head.weight.detach().double()
    W = [model.blocks[i].lin.weight.detach().double() for i in range(3)]
    expected = {
        "blocks.2.lin.weight": H.T @ H,
        "blocks.1.lin.weight": (H @ W[2]).T @ (H @ W[2]),
        "blocks.0.lin.weight": (H @ W[2] @ W[1]).T @ (H @ W[2] @ W[1]),
    }
    for key, P in expected.items():
        exact = 8 * P
        rel = float(torch.linalg.matrix_norm(G[key] - exact) / torch.linalg.matrix_norm(exact))
        assert rel < 0.05, (key, rel)


def test_output_grams_leave_frozen_model_frozen_and_mode_restored():
    torch.manual_seed(0)
    model = LinStack().train()
    for p in model.parameters():
        p.requires_grad_(False)
    G = collect_output_grams(model, gram_owners(model), [torch.randn(4, 5, 6)], probes=2)
    assert set(G) == {f"blocks.{i}.lin.weight" for i in range(3)}
    assert not any(p.requires_grad for p in model.parameters())
    assert model.training


def test_output_grams_skip_padding_tokens():
    """Padding positions get no probe and feed no real token: 2 x 6 real tokens give a Gram of rank
    <= 12 although the batch has 2 x 9 positions and the query output is 32 wide."""
    model = bert()
    ids = torch.cat([torch.randint(5, 90, (2, 6)), torch.zeros(2, 3, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(2, 6, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long)], 1)
    owners = gram_owners(model)
    key = next(k for k in owners if k.endswith("query.weight"))
    G = collect_output_grams(
        model, {key: owners[key]}, [{"input_ids": ids, "attention_mask": mask}], probes=1
    )
    assert G[key].shape == (32, 32)
    assert int(torch.linalg.matrix_rank(G[key], rtol=1e-4)) == 12  # float32 products: noise below 1e-6


def test_conv_output_grams_are_per_channel():
    torch.manual_seed(0)
    model = ConvStack().eval()
    owners = gram_owners(model)
    G = collect_output_grams(model, owners, [torch.randn(2, 3, 16, 16)], probes=2)
    for key, module in owners.items():
        if isinstance(module, nn.Conv2d) and key in G:
            assert G[key].shape == (module.out_channels, module.out_channels)


# ---------------------------------------------------------------- two-sided math


def _spd(n, seed, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.logspace(0, -spread, n, dtype=torch.float64)
    return (Q * lam) @ Q.T


def _stack(N=4, d=8, h=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(d, h, generator=g, dtype=torch.float64)
    W = [base + 0.5 * torch.randn(d, h, generator=g, dtype=torch.float64) for _ in range(N)]
    C = [_spd(h, 10 + i) for i in range(N)]
    G = [_spd(d, 20 + i) for i in range(N)]
    return W, C, G


def _two_sided_error(W, S, P, C, G):
    return sum(
        float(torch.trace(Gi @ (Wi - S - Pi) @ Ci @ (Wi - S - Pi).T))
        for Wi, Pi, Ci, Gi in zip(W, P, C, G, strict=False)
    )


def test_two_sided_shared_solves_the_normal_equations():
    W, C, G = _stack()
    Wt = torch.stack(W)
    S = weighted_shared(Wt, C, left=G, max_iter=500, tol=1e-12)
    residual = sum(Gi @ (S - Wi) @ Ci for Wi, Ci, Gi in zip(W, C, G, strict=False))
    assert float(torch.linalg.matrix_norm(residual)) < 1e-8 * float(
        torch.linalg.matrix_norm(sum(Gi @ Wi @ Ci for Wi, Ci, Gi in zip(W, C, G, strict=False)))
    )
    zero = [torch.zeros_like(w) for w in W]
    # every CG iterate lowers the error from the start: a capped solve is never worse than its start
    start = Wt.mean(0)
    errs = [
        _two_sided_error(W, weighted_shared(Wt, C, left=G, start=start, max_iter=k), zero, C, G)
        for k in (0, 1, 2, 5, 20)
    ]
    assert errs[0] == pytest.approx(_two_sided_error(W, start, zero, C, G))
    assert all(b <= a * (1 + 1e-12) for a, b in zip(errs, errs[1:], strict=False))
    assert errs[-1] < 0.9 * errs[0]


def test_identity_output_grams_reduce_to_the_closed_form():
    W, C, _ = _stack()
    Wt = torch.stack(W)
    eye = [torch.eye(8, dtype=torch.float64)] * 4
    closed = weighted_shared(Wt, C)
    assert torch.allclose(
        weighted_shared(Wt, C, left=eye, start=Wt.mean(0), max_iter=100, tol=1e-14), closed, atol=1e-9
    )
    one = decompose_weighted(W, [3] * 4, C)
    two = decompose_weighted(W, [3] * 4, C, out_grams=eye)
    assert two.weighted_error == pytest.approx(one.weighted_error, rel=1e-8)


def test_two_sided_truncation_is_optimal_for_the_two_sided_error():
    W, C, G = _stack(seed=1)
    ranks = [2, 3, 1, 4]
    two = decompose_weighted(W, ranks, C, out_grams=G)
    one = decompose_weighted(W, ranks, C)
    S2 = two.shared.double()
    P2 = [(f.B @ f.A).double() for f in two.layers]
    P1 = [(f.B @ f.A).double() for f in one.layers]
    err2 = _two_sided_error(W, S2, P2, C, G)
    # the reported weighted error is the true two-sided error (floor/damp 0 here: C, G as given)
    Ce = [whitener(c).gram() for c in C]
    Ge = [whitener(g).gram() for g in G]
    assert err2 == pytest.approx(_two_sided_error(W, S2, P2, Ce, Ge), rel=1e-6)
    assert err2 == pytest.approx(two.total_weighted_error, rel=1e-4)
    # with the same shared part, the two-sided SVD beats the input-whitened one on the two-sided error
    one_same = decompose_weighted(W, ranks, C, shared=S2)
    P1s = [(f.B @ f.A).double() for f in one_same.layers]
    assert err2 < _two_sided_error(W, S2, P1s, C, G)
    assert err2 < _two_sided_error(W, one.shared.double(), P1, C, G)
    # spectra for the budget: what each rank unit removes against the budget's screening solve of
    # the shared part, summing to the residual energy
    screen, spectra = shared_and_spectra(W, C, out_grams=G)
    assert all(torch.equal(a, b) for a, b in zip(spectra, whitened_spectra(W, C, out_grams=G), strict=False))
    on_screen = decompose_weighted(W, ranks, C, out_grams=G, shared=screen)
    for s, e, k in zip(spectra, on_screen.weighted_error, ranks, strict=False):
        assert float(s[k:].sum()) == pytest.approx(e, rel=1e-4)
    # a fit handed the screening solve solves on from it (3 + 10 iterations): its residual, the
    # solve's objective, is below the screening one's and here below a fresh 10-iteration solve's
    polished = decompose_weighted(W, ranks, C, out_grams=G, shared=screen, screened=True)
    assert sum(polished.weighted_residual) < 0.8 * sum(on_screen.weighted_residual)
    assert sum(polished.weighted_residual) <= sum(two.weighted_residual)
    assert polished.total_weighted_error == pytest.approx(two.total_weighted_error, rel=0.03)


def test_float32_grams_give_the_budget_its_float64_spectra_and_screen_to_float32_accuracy():
    """Grams kept on disk are float32: the budget whitens, and applies the solve's preconditioner,
    in float32 (half the time) and gets what float64 Grams give, to float32's accuracy."""
    W, C, G = _stack(seed=4)
    S64, s64 = shared_and_spectra(W, C, out_grams=G, damp=0.1)
    C32, G32 = [c.float() for c in C], [g.float() for g in G]
    S32, s32 = shared_and_spectra(W, C32, out_grams=G32, damp=0.1)
    assert S32.dtype == torch.float64 and all(s.dtype == torch.float64 for s in s32)
    assert float(torch.linalg.matrix_norm(S32 - S64) / torch.linalg.matrix_norm(S64)) < 1e-5
    for a, b in zip(s64, s32, strict=True):
        tails64, tails32 = a.flip(0).cumsum(0).flip(0), b.flip(0).cumsum(0).flip(0)  # error left at rank k
        torch.testing.assert_close(tails32, tails64, rtol=1e-4, atol=0.0)


def test_two_sided_refinement_never_increases_the_error():
    W, C, G = _stack(seed=2)
    f = decompose_weighted(W, [2] * 4, C, out_grams=G, refine=6)
    h = f.history
    assert len(h) == 7
    assert all(b <= a * (1 + 1e-9) for a, b in zip(h, h[1:], strict=False))
    assert h[-1] < h[0]


def test_rebalance_keeps_the_product_and_equalizes_norms():
    g = torch.Generator().manual_seed(0)
    B = torch.randn(7, 3, generator=g, dtype=torch.float64) * 1e3
    A = torch.randn(3, 5, generator=g, dtype=torch.float64) * 1e-4
    B[:, 1] = 0.0  # a zero unit is left alone
    B2, A2 = rebalance(B, A)
    assert torch.allclose(B2 @ A2, B @ A, rtol=1e-12, atol=1e-15)
    nb, na = B2.norm(dim=0), A2.norm(dim=1)
    assert torch.allclose(nb[[0, 2]], na[[0, 2]], rtol=1e-12)
    assert torch.equal(A2[1], A[1])


def test_budget_follows_output_sensitivity():
    """Two identical stacks, one whose output matters 100x more: it gets the rank."""
    W, C, G = _stack(seed=3)
    s_low = whitened_spectra(W, C, out_grams=G)
    s_high = whitened_spectra(W, C, out_grams=[100 * g for g in G])
    items = [
        BudgetItem(d=8, h=10, spectra=[s.tolist() for s in s_low], name="low"),
        BudgetItem(d=8, h=10, spectra=[s.tolist() for s in s_high], name="high"),
    ]
    alloc = allocate_ranks(items, 0.5)
    assert sum(alloc.ranks[1]) > sum(alloc.ranks[0])


# ---------------------------------------------------------------- end to end


def _bert_batches(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(5, 90, (4, 10), generator=g),
            "attention_mask": torch.ones(4, 10, dtype=torch.long),
        }
        for _ in range(n)
    ]


def test_collect_grams_objectives():
    model = bert()
    batches = _bert_batches()
    out = collect_grams(model, batches, probes=2)
    layer = collect_grams(model, batches, objective="layer")
    assert out.objective == "output" and layer.objective == "layer"
    assert set(out.out_grams) == set(out.grams) and not layer.out_grams
    assert all(torch.equal(out.grams[k], layer.grams[k]) for k in layer.grams)
    assert out.summary()["objective"] == "output"
    with pytest.raises(LorsUsageError, match="objective must be one of output, layer"):
        collect_grams(model, batches, objective="model")


def test_output_objective_lowers_the_model_output_error_at_equal_budget():
    """What the output objective is for: at the same parameter budget, the model output (on the
    calibration inputs) is closer to the source's than with each layer's own error as objective."""
    source = bert()
    batches = _bert_batches(n=6)
    ref = reference_outputs(source, batches)
    errors = {}
    fractions = {}
    for objective in ("output", "layer"):
        cal = collect_grams(source, batches, objective=objective, probes=4)
        model, report = convert(copy.deepcopy(source), calibration=cal, budget=0.5)
        errors[objective] = fidelity(model, ref)["heldout_rel_error"]
        fractions[objective] = report.quality["stacked_fraction"]
    assert fractions["output"] == pytest.approx(0.5, abs=0.01)
    assert fractions["layer"] == pytest.approx(0.5, abs=0.01)
    assert errors["output"] < errors["layer"], errors
