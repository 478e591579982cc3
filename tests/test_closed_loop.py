"""Closed-loop refits: the math against a brute-force least squares, the pass against the open-loop
fit where the two must agree, and the models it cannot walk."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from lors_convert.calibrate.batches import primary_output
from lors_convert.calibrate.closed_loop import _formed, block_chain, closed_loop_pass, first_block_calls
from lors_convert.calibrate.data import CalibrationData
from lors_convert.calibrate.fidelity import Reference, fidelity
from lors_convert.calibrate.grams import collect_grams
from lors_convert.cli import app
from lors_convert.conversion import calibrated_convert, convert, source_blocks
from lors_convert.counting import count_parameters
from lors_convert.decompose.closed_loop import closed_loop_factors, loop_inputs
from lors_convert.fit.closed_loop import refitter
from lors_convert.layers.linear import LorsLinear
from lors_convert.options import ConvertOptions
from tests.clirun import run_ok, runner
from tests.models import StackedMLP, tiny_llama, token_batches


def _objective(W, approx, Xs, Xc):
    return float(((Xs @ W.T - Xc @ approx.T) ** 2).sum())  # rows: positions


def test_closed_loop_factors_are_the_least_squares_fit_on_the_converted_inputs():
    g = torch.Generator().manual_seed(0)
    n_out, n_in, rows, k = 12, 10, 400, 4
    W = torch.randn(n_out, n_in, generator=g, dtype=torch.float64)
    shared = torch.randn(n_out, n_in, generator=g, dtype=torch.float64) * 0.5
    Xs = torch.randn(rows, n_in, generator=g, dtype=torch.float64)
    Xc = Xs + 0.3 * torch.randn(rows, n_in, generator=g, dtype=torch.float64)  # upstream error
    C, K = Xc.T @ Xc / rows, Xs.T @ Xc / rows
    # full rank, no floor or damping: the unconstrained least squares W K C^-1
    B, A, _, discarded, _ = closed_loop_factors(W, shared, loop_inputs(C, K), n_in)
    exact = torch.linalg.lstsq(Xc, Xs @ W.T).solution.T  # (out, in)
    torch.testing.assert_close(shared + B @ A, exact, rtol=1e-9, atol=1e-9)
    assert abs(discarded) < 1e-18
    # rank k: no other rank-k private part does better on the objective than the closed-loop one
    B, A, _, _, _ = closed_loop_factors(W, shared, loop_inputs(C, K), k)
    best = _objective(W, shared + B @ A, Xs, Xc)
    U, S, Vh = torch.linalg.svd(W - shared)
    open_loop = shared + (U[:, :k] * S[:k]) @ Vh[:k]  # the plain truncation, blind to Xc
    assert best < _objective(W, open_loop, Xs, Xc)
    for _ in range(20):  # rank-k neighbours: the factors perturbed
        dB = 1e-3 * torch.randn(n_out, k, generator=g, dtype=torch.float64)
        dA = 1e-3 * torch.randn(k, n_in, generator=g, dtype=torch.float64)
        assert best <= _objective(W, shared + (B + dB) @ (A + dA), Xs, Xc)


def test_loop_inputs_mix_is_the_partial_correction_plus_the_ridge_and_leaves_its_grams_alone():
    """``K_a + C' - C`` with ``K_a = a K + (1 - a) C`` and ``C'`` the floored, damped Gram, formed as
    ``a (K - C) + C'`` (one matrix beside the inputs); ``C`` and ``K`` are read, never written."""
    g = torch.Generator().manual_seed(3)
    Xs = torch.randn(40, 6, generator=g, dtype=torch.float64)
    Xc = Xs + 0.2 * torch.randn(40, 6, generator=g, dtype=torch.float64)
    Xc[:, 5] = Xc[:, 4]  # a singular Gram: the floor adds a ridge
    C, K = Xc.T @ Xc / 40, Xs.T @ Xc / 40
    C0, K0 = C.clone(), K.clone()
    inputs = loop_inputs(C, K, floor=1e-3, damp=0.01, correction=0.5)
    effective = inputs.right.gram()  # C'
    assert float(torch.linalg.matrix_norm(effective - C)) > 1e-4  # the ridge is there
    torch.testing.assert_close(inputs.mix, 0.5 * K + 0.5 * C + effective - C, rtol=1e-12, atol=1e-14)
    assert torch.equal(C, C0) and torch.equal(K, K0)


def test_float32_loop_grams_fit_in_float32_to_float32_accuracy():
    """A float32 model's loop Grams are float32 (as its calibration Grams are), and then so is the
    refit: the same factors' product and objective as a float64 fit, to float32's accuracy. A float64
    Gram on either side keeps the fit in float64."""
    g = torch.Generator().manual_seed(5)
    n_out, n_in, rows, k = 24, 20, 400, 6
    W = torch.randn(n_out, n_in, generator=g, dtype=torch.float64)
    Xs = torch.randn(rows, n_in, generator=g, dtype=torch.float64)
    Xc = Xs + 0.3 * torch.randn(rows, n_in, generator=g, dtype=torch.float64)
    C, K = Xc.T @ Xc / rows, Xs.T @ Xc / rows
    Y = torch.randn(rows, n_out, generator=g, dtype=torch.float64)
    G = Y.T @ Y / rows  # an output-side Gram
    opts = dict(floor=1e-6, damp=0.1)
    wide = closed_loop_factors(W, None, loop_inputs(C, K, correction=0.5, **opts), k, G, **opts)
    narrow = closed_loop_factors(
        W.float(), None, loop_inputs(C.float(), K.float(), correction=0.5, **opts), k, G.float(), **opts
    )
    assert wide.B.dtype == torch.float64 and narrow.B.dtype == narrow.A.dtype == torch.float32
    product = wide.B @ wide.A
    assert float(torch.linalg.matrix_norm((narrow.B @ narrow.A).double() - product)) < 1e-5 * float(
        torch.linalg.matrix_norm(product)
    )
    assert narrow.discarded == pytest.approx(wide.discarded, rel=1e-5)
    assert narrow.energy == pytest.approx(wide.energy, rel=1e-6)
    mixed = closed_loop_factors(
        W, None, loop_inputs(C.float(), K.float(), correction=0.5, **opts), k, G, **opts
    )
    assert mixed.B.dtype == torch.float64


def test_a_float32_model_gives_the_refit_float32_loop_grams():
    source = tiny_llama()
    batches = token_batches(61, n=2)
    members = [f"model.layers.{i}" for i in range(3)]
    sources = {m: copy.deepcopy(source.get_submodule(m)) for m in members}
    model, _ = convert(copy.deepcopy(source), rank=2)
    seen = []
    closed_loop_pass(model, sources, batches, lambda group, C, K: seen.append((C.dtype, K.dtype)))
    assert seen and set(seen) == {(torch.float32, torch.float32)}


def test_the_loop_runs_each_converted_block_through_its_formed_weights_and_puts_its_layers_back():
    """Inside ``_formed`` each LORS layer is the dense ``nn.Linear`` of its current factors: the block's
    output equals the factored one to float32 rounding; on exit the block holds its LORS layers again."""
    source = tiny_llama()
    model, _ = convert(copy.deepcopy(source), rank=2)
    block = model.model.layers[1]
    lors = {n: m for n, m in block.named_modules() if isinstance(m, LorsLinear)}
    assert lors
    x = torch.randn(2, 5, source.config.hidden_size, generator=torch.Generator().manual_seed(3))
    ((args, kwargs),) = first_block_calls(
        model, "model.layers.1", [{"input_ids": torch.randint(0, 61, (2, 5))}]
    )
    with torch.no_grad():
        factored = primary_output(block(x, *args[1:], **kwargs))
        with _formed(block):
            assert not any(isinstance(m, LorsLinear) for m in block.modules())
            dense = primary_output(block(x, *args[1:], **kwargs))
    torch.testing.assert_close(dense, factored, rtol=1e-5, atol=1e-6)
    assert {n: m for n, m in block.named_modules() if isinstance(m, LorsLinear)} == lors


def test_equal_inputs_give_the_open_loop_factors_back():
    """With ``Xc = Xs`` (``K = C``) the closed-loop fit is the open-loop one, floor and damping
    included: the first block's first group is refitted to what it was."""
    source = tiny_llama()
    batches = token_batches(61, n=6)
    calibration = collect_grams(source, batches)
    members = [f"model.layers.{i}" for i in range(3)]
    sources = {m: copy.deepcopy(source.get_submodule(m)) for m in members}
    model, _ = convert(copy.deepcopy(source), budget=0.6, calibration=calibration)
    before = {
        n: (m.lors_B.detach().clone(), m.lors_A.detach().clone())
        for n, m in model.named_modules()
        if isinstance(m, LorsLinear)
    }
    refitted = closed_loop_pass(model, sources, batches, refitter(calibration))
    assert refitted == sum(
        1 for m in model.model.layers.modules() if isinstance(m, LorsLinear) and m.total_rank > 0
    )
    first = [
        n for n in before if n.startswith("model.layers.0.self_attn.") and n.endswith(("q_proj", "k_proj"))
    ]
    assert first
    for n in first:
        layer = model.get_submodule(n)
        B0, A0 = before[n]
        torch.testing.assert_close(layer.lors_B @ layer.lors_A, B0 @ A0, rtol=1e-5, atol=1e-6)


def test_a_group_shares_one_decomposition_of_its_input_and_fits_as_each_layer_alone(monkeypatch):
    """q, k and v read one input: their refit (those the budget factored) decomposes its Gram once, and each layer's factors are
    bit-identical to the layer refitted on its own."""
    import lors_convert.decompose.whitener as whitener_module

    source = tiny_llama()
    batches = token_batches(61, n=6)
    calibration = collect_grams(source, batches)
    model, _ = convert(copy.deepcopy(source), budget=0.6, calibration=calibration)
    attn, src = (
        model.get_submodule("model.layers.1.self_attn"),
        source.get_submodule("model.layers.1.self_attn"),
    )
    names = [n for n in ("q_proj", "k_proj", "v_proj") if isinstance(attn.get_submodule(n), LorsLinear)]
    assert len(names) >= 2
    n_in = src.q_proj.in_features
    g = torch.Generator().manual_seed(1)
    Xs = torch.randn(300, n_in, generator=g, dtype=torch.float64)
    Xc = Xs + 0.2 * torch.randn(300, n_in, generator=g, dtype=torch.float64)
    C, K = Xc.T @ Xc / 300, Xs.T @ Xc / 300
    group = [
        (f"model.layers.1.self_attn.{n}.weight", attn.get_submodule(n), src.get_submodule(n)) for n in names
    ]
    refit = refitter(calibration)
    alone = {}
    for item in group:
        refit([item], C, K)
        alone[item[0]] = (item[1].lors_B.detach().clone(), item[1].lors_A.detach().clone())
    sizes = []
    for key in [key for key in whitener_module._CACHE if key[0] == id(C)]:
        del whitener_module._CACHE[key]  # the single refits above cached their square root of C
    for name in ("gram_eigh", "gram_cholesky"):  # every square root of a Gram goes through one of them
        real = getattr(whitener_module, name)
        monkeypatch.setattr(
            whitener_module, name, lambda M, *a, real=real: sizes.append(M.shape[0]) or real(M, *a)
        )
    refit(group, C, K)
    assert sizes.count(n_in) == 1
    for key, layer, _ in group:
        assert torch.equal(layer.lors_B, alone[key][0]) and torch.equal(layer.lors_A, alone[key][1]), key


def test_blocks_that_do_not_form_one_chain_are_named():
    model = tiny_llama()
    batch = token_batches(61, n=1)[0]
    assert block_chain(model, [f"model.layers.{i}" for i in range(3)], batch) is None
    why = block_chain(model, [f"model.layers.{i}" for i in (0, 2, 1)], batch)
    assert why == "its stacked blocks do not run once each, in order"


def test_cli_closed_loop_refits_a_calibrated_conversion_and_refuses_others(tmp_path):
    torch.manual_seed(0)
    src, data = tmp_path / "mlp.safetensors", tmp_path / "data.safetensors"
    save_file(StackedMLP().state_dict(), str(src))
    save_file({"x": torch.randn(96, 8, generator=torch.Generator().manual_seed(5))}, str(data))
    common = [src, "--arch", "tests.models:stacked_mlp"]
    res = run_ok(
        "convert",
        *common,
        "--calibrate",
        data,
        "--budget",
        "0.5",
        "--closed-loop",
        "--json",
        "-o",
        tmp_path / "c.lors",
    )
    quality = json.loads(res.stdout)["quality"]
    assert quality["closed_loop_layers"] == 8  # 4 blocks x 2 Linears
    res = run_ok(
        "convert", *common, "--calibrate", data, "--budget", "0.5", "--closed-loop", "-o", tmp_path / "h.lors"
    )
    assert "closed loop: 8 layers refitted on the converted model's inputs" in res.stdout
    for args, message in (
        (("--rank", "2"), "--closed-loop refits a calibrated conversion"),
        (("--calibrate", data, "--target", "rel-error=0.5"), "(not --target)"),
    ):
        out = tmp_path / "bad.lors"
        res = runner.invoke(app, [str(a) for a in ("convert", *common, *args, "--closed-loop", "-o", out)])
        assert res.exit_code == 2 and message in res.stderr, (args, res.output)
        assert "Traceback" not in res.output and not out.exists()


def test_closed_loop_is_the_default_for_causal_lms_only(tmp_path):
    source = tiny_llama()
    calibration = token_batches(61, n=4, seed=1)
    data = CalibrationData(calibration, [], "text", "tokens", len(calibration), 0, "")
    model, report = calibrated_convert(copy.deepcopy(source), data, budget=0.5)
    lors_layers = sum(isinstance(m, LorsLinear) and m.total_rank > 0 for m in model.modules())
    assert lors_layers > 0 and report.quality["closed_loop_layers"] == lors_layers
    _, report = calibrated_convert(copy.deepcopy(source), data, budget=0.5, closed_loop=False)
    assert "closed_loop_layers" not in report.quality and not report.warnings
    mlp = StackedMLP()  # not a causal LM: open loop unless asked
    batches = [{"x": torch.randn(24, 8, generator=torch.Generator().manual_seed(5))}]
    _, report = calibrated_convert(mlp, CalibrationData(batches, [], "tensor", "x", 1, 0, ""), budget=0.5)
    assert "closed_loop_layers" not in report.quality and not report.warnings


@pytest.mark.parametrize("budget", [0.3, 0.7])
def test_closed_loop_lowers_the_end_to_end_error_at_equal_parameters(budget):
    source = tiny_llama()
    calibration, heldout = token_batches(61, n=8, seed=1), token_batches(61, n=4, seed=7)
    data = CalibrationData(calibration, [], "text", "tokens", len(calibration), 0, "")
    errors, params = {}, {}
    for closed in (False, True):
        model, report = calibrated_convert(copy.deepcopy(source), data, budget=budget, closed_loop=closed)
        errors[closed] = fidelity(model, Reference(source, heldout))["heldout_rel_error"]
        params[closed] = count_parameters(model)
    assert params[True] == params[False]
    assert (
        errors[True] < 0.97 * errors[False]
    )  # measured: 0.071 against 0.075 at 0.3, 0.035 against 0.039 at 0.7


def test_source_blocks_waiting_on_disk_give_the_same_conversion_as_copies_in_memory(tmp_path):
    """The closed loop's source blocks kept on disk (``spill``) come back one at a time equal to their
    in-memory copies, hold no parameter in memory while they wait, and the closed loop refits the same
    factors bit for bit from them."""
    from lors_convert.io.spill import Spill, SpilledModules

    source = tiny_llama()
    batches = token_batches(61, n=6)
    members = [f"model.layers.{i}" for i in range(3)]
    spill = Spill(near=tmp_path)
    waiting = SpilledModules({m: source.get_submodule(m) for m in members}, spill)
    assert list(waiting) == members and len(waiting) == 3
    assert all(p.is_meta for skeleton, _ in waiting._skeletons.values() for p in skeleton.parameters())
    back = waiting.pop(members[1])
    assert list(waiting) == [members[0], members[2]]
    original = source.get_submodule(members[1])
    assert [n for n, _ in back.named_parameters()] == [n for n, _ in original.named_parameters()]
    for (n, a), b in zip(back.state_dict().items(), original.state_dict().values(), strict=True):
        assert torch.equal(a, b) and a.dtype == b.dtype, n
    x = torch.randn(2, 5, original.self_attn.q_proj.in_features)
    position = torch.arange(5)[None]
    rotary = source.model.rotary_emb(x, position)
    torch.testing.assert_close(
        back(x, position_embeddings=rotary)[0], original(x, position_embeddings=rotary)[0]
    )

    calibration = collect_grams(source, batches)
    converted, _ = convert(copy.deepcopy(source), budget=0.6, calibration=calibration)
    results = []
    for spilled in (None, Spill(near=tmp_path)):
        sources = source_blocks(source, ConvertOptions(), batches, [], spilled)
        assert isinstance(sources, dict if spilled is None else SpilledModules)
        model = copy.deepcopy(converted)
        assert closed_loop_pass(model, sources, batches, refitter(calibration)) > 0
        results.append(model.state_dict())
    for (name, a), b in zip(results[0].items(), results[1].values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("sharing", ["auto", "always"])
def test_fits_left_to_the_closed_loop_give_the_model_of_open_loop_fits_refitted(monkeypatch, sharing):
    """A calibrated conversion whose closed loop refits every private factor solves only the shared
    parts before it (no open-loop SVD): the same model, bit for bit, as the open-loop fits with the
    loop run over them, and a report whose figures are those of the factors it wrote."""
    import lors_convert.fit.calibrated as calibrated_module

    source = tiny_llama()
    batches = token_batches(61, n=6)
    calibration = collect_grams(source, batches)
    reference, _ = convert(copy.deepcopy(source), budget=0.6, calibration=calibration, sharing=sharing)
    sources = source_blocks(source, ConvertOptions(), batches, [])
    closed_loop_pass(reference, sources, batches, refitter(calibration))

    real = calibrated_module.weighted_basis

    def shared_only(*args, **kwargs):
        assert kwargs.get("layer_svds") is False, (
            "an open-loop fit was computed for factors the loop replaces"
        )
        return real(*args, **kwargs)

    monkeypatch.setattr(calibrated_module, "weighted_basis", shared_only)
    monkeypatch.setattr(calibrated_module, "decompose_weighted", shared_only)
    data = CalibrationData(batches, [], "text", "tokens", len(batches), 0, "")
    model, report = calibrated_convert(copy.deepcopy(source), data, budget=0.6, sharing=sharing)
    state, expected = model.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in state.items():
        assert torch.equal(tensor, expected[name]), name
    assert any(m.shared is not None for m in model.modules() if isinstance(m, LorsLinear)) == (
        sharing == "always"
    )
    (stack,) = report.stacks
    for row in stack.matrices:
        for i, member in enumerate(stack.members):
            W = source.get_parameter(f"{member}.{row.name}").detach().double()
            approx = (
                model.get_submodule(f"{member}.{row.name.removesuffix('.weight')}").to_dense().weight.detach()
            )
            error = float(torch.linalg.matrix_norm(W - approx.double()) / torch.linalg.matrix_norm(W))
            assert row.relative_error[i] == pytest.approx(error, rel=1e-4, abs=1e-6), (member, row.name)
            assert 0.0 <= row.retained_energy[i] <= 1.0
    assert 0.0 < report.quality["calib_rel_output_error_mean"] <= report.quality["calib_rel_output_error_max"]
