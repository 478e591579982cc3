"""GGUF in and out on tiny Llama files written as llama.cpp writes them (tests/gguf_models.py).

Reading is checked against the model the file was written from (exact for F32) and against
transformers' own GGUF loader; conversion and merge round trips against the dequantized source;
the GGUF output by reading it back with the gguf package and with transformers.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import lors_convert
from lors_convert.checkpoint import Checkpoint
from lors_convert.cli import app
from tests.clirun import run_ok, runner

pytest.importorskip("gguf")
from tests import gguf_models as gm  # noqa: E402  (needs gguf)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
run = run_ok


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """The source model (tied) and its GGUF as F32 and Q8_0, an untied one with a rope_freqs tensor."""
    d = tmp_path_factory.mktemp("gguf")
    tied, untied = gm.llama(tied=True), gm.llama(tied=False, seed=1)
    rope = np.linspace(
        1.0, 4.0, 8, dtype=np.float32
    )  # llama.cpp's rope scaling factors: no place in the model
    return {
        "model": tied,
        "untied_model": untied,
        "dir": d,
        "F32": gm.write(d / "tiny-f32.gguf", tied, "F32"),
        "Q8_0": gm.write(d / "tiny-q8.gguf", tied, "Q8_0"),
        "untied": gm.write(d / "untied-q4.gguf", untied, "Q4_1", extra={"rope_freqs.weight": (rope, "F32")}),
    }


def transformers_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[5, 71, 200, 33, 260, 9, 140]])


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_reads_every_tensor_as_transformers_does(files, qtype):
    from lors_convert.io.sources import load_source, open_lazy

    path = files[qtype]
    meta, tensors, info = open_lazy(path)
    assert info.kind == "gguf" and info.arch == "LlamaForCausalLM"
    assert meta.lm_head.weight is meta.model.embed_tokens.weight  # tied on the meta device
    assert "lm_head.weight" not in tensors and len(tensors.keys()) == 2 + 9 * gm.LAYERS
    reference = transformers_model(path).state_dict()
    source = files["model"].state_dict()
    for key in tensors.keys():
        t = tensors.get(key)
        assert t.dtype == torch.float32 and tuple(t.shape) == tensors.shapes[key]
        assert torch.equal(t, reference[key].float()), key  # same dequantization, names and q/k layout
        if qtype == "F32":
            assert torch.equal(t, source[key]), key  # llama.cpp's q/k permutation undone exactly
    model, info = load_source(path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert torch.equal(logits(model, IDS), logits(transformers_model(path), IDS))


def test_convert_then_merge_to_a_transformers_directory(files, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = files["Q8_0"]
    ckpt = tmp_path / "q8.lors"
    run("convert", src, "--rank", "full", "--keep-unsaving", "-o", ckpt, "-q")
    config = Checkpoint(ckpt).config
    assert (
        config["source"]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    )  # hashed beside the build
    assert (
        config["source"]["kind"] == "gguf"
        and config["manifest"]["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
        and config["manifest"]["stored_aliases"] == []
    )
    source = transformers_model(src)
    lors_model = lors_convert.load(ckpt)  # runnable LORS model from the checkpoint alone
    assert lors_model.lm_head.weight is lors_model.model.embed_tokens.weight
    ref = logits(source, IDS)
    assert (logits(lors_model, IDS) - ref).norm() / ref.norm() <= 1e-5

    run("merge", ckpt, "-o", tmp_path / "dense", "-q")
    stored = load_file(str(tmp_path / "dense" / "model.safetensors"))
    assert sorted(stored) == sorted(k for k in source.state_dict() if k != "lm_head.weight")  # the tie once
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "dense")).eval()
    assert merged.lm_head.weight is merged.model.embed_tokens.weight  # from_pretrained re-ties
    for key, t in source.state_dict().items():
        assert (merged.state_dict()[key] - t).abs().max() <= 1e-5 * t.abs().max(), key
    assert (logits(merged, IDS) - ref).norm() / ref.norm() <= 1e-5
    assert not (tmp_path / "dense" / "gguf_metadata.gguf").exists()
    text = "the hello all the tell"
    assert (
        AutoTokenizer.from_pretrained(str(tmp_path / "dense"))(text)["input_ids"]
        == AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)(text)["input_ids"]
    )


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_merge_to_gguf_gives_the_source_tensors_and_metadata(files, tmp_path, outtype):
    import gguf

    src = files["Q8_0"]
    ckpt = tmp_path / "q8.lors"
    run("convert", src, "--rank", "4", "-o", ckpt, "-q")  # truncated: the merge is LORS's approximation
    exact = tmp_path / "full.lors"
    run("convert", src, "--rank", "full", "--keep-unsaving", "-o", exact, "-q")
    out = tmp_path / f"merged-{outtype}.gguf"
    args = ["--outtype", outtype] if outtype == "f16" else []
    run("merge", exact, "-o", out, "--format", "gguf", *args, "-q")

    (source, meta_in), (merged, meta_out) = gm.contents(src), gm.contents(out)
    assert sorted(merged) == sorted(source)  # same names: no output.weight for the tied head
    tol = 1e-5 if outtype == "f32" else 1e-3
    for name, t in source.items():
        assert merged[name].shape == t.shape, name
        assert np.abs(merged[name] - t).max() <= tol * np.abs(t).max(), name
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    want_2d = "F16" if outtype == "f16" else "F32"
    assert all(types[n] == (want_2d if source[n].ndim == 2 else "F32") for n in source), types
    assert meta_out.keys() == meta_in.keys()
    assert {k for k in meta_in if str(meta_in[k]) != str(meta_out[k])} == {"general.file_type"}
    assert meta_out["general.file_type"] == (1 if outtype == "f16" else 0)  # MOSTLY_F16 / ALL_F32

    reread = transformers_model(out)  # transformers' GGUF reader accepts it: same function as the source
    ref = logits(transformers_model(src), IDS)
    assert (logits(reread, IDS) - ref).norm() / ref.norm() <= (1e-5 if outtype == "f32" else 1e-2)

    approx = tmp_path / "r4.gguf"
    run("merge", ckpt, "-o", approx, "-q")  # a .gguf output name chooses the format
    lors_model = lors_convert.load(ckpt)
    got = logits(transformers_model(approx), IDS)
    want = logits(lors_model, IDS)
    assert (got - want).norm() / want.norm() <= 1e-5  # the GGUF holds the rank-4 model's weights


def test_untied_head_and_tensors_without_a_place(files, tmp_path):
    src = files["untied"]
    ckpt = tmp_path / "u.lors"
    res = run("convert", src, "--rank", "full", "--keep-unsaving", "-o", ckpt, "--json")
    warnings = json.loads(res.stdout)["warnings"]
    assert any("rope_freqs.weight" in w and "GGUF output" in w for w in warnings), warnings
    assert Checkpoint(ckpt).manifest["aliases"] == {}
    run("merge", ckpt, "-o", tmp_path / "dense", "-q")
    stored = load_file(str(tmp_path / "dense" / "model.safetensors"))
    assert "lm_head.weight" in stored and not any("rope" in k for k in stored)
    out = tmp_path / "u.gguf"
    run("merge", ckpt, "-o", out, "-q")
    (source, _), (merged, _) = gm.contents(src), gm.contents(out)
    assert sorted(merged) == sorted(source) and "output.weight" in merged
    assert np.array_equal(merged["rope_freqs.weight"], source["rope_freqs.weight"])  # carried through as is
    for name, t in source.items():
        assert np.abs(merged[name] - t).max() <= 1e-5 * np.abs(t).max(), name


def test_report_projects_a_gguf_source(files):
    res = run("report", files["Q8_0"], "--ranks", "4,8", "--json")
    sweep = json.loads(res.stdout)
    assert [row["rank"] for row in sweep["ranks"]] == [4, 8]


def test_merge_gguf_needs_a_gguf_source(tmp_path):
    from tests.badcase import ARCH, assert_clean_failure, write_weights

    src = write_weights(tmp_path / "w.safetensors")
    ckpt = tmp_path / "c.lors"
    run("convert", src, "--arch", ARCH, "--rank", "4", "-o", ckpt, "-q")
    for args, words in (
        (["--format", "gguf"], ("needs a checkpoint converted from a GGUF file",)),
        (["--outtype", "f16"], ("--outtype goes with --format gguf",)),
        (["--format", "onnx"], ("--format must be one of hf, gguf",)),
    ):
        res = runner.invoke(app, ["merge", str(ckpt), "-o", str(tmp_path / "out"), *args])
        assert_clean_failure(res, 2, words, None)
        assert not (tmp_path / "out").exists()


def test_calibrate_and_heal_a_gguf_source_then_merge_to_gguf(files, tmp_path):
    """Text calibration tokenizes with the GGUF's own tokenizer; heal re-saves the side files, so the
    healed checkpoint still merges into a GGUF with the source's metadata."""
    src = files["Q8_0"]
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(f"the hello {i} all tell the {i * 7} well" for i in range(24)))
    cal = tmp_path / "cal.lors"
    run("convert", src, "--calibrate", text, "--rank", "4", "-o", cal, "-q")
    healed = tmp_path / "healed.lors"
    run("heal", cal, "--data", text, "--steps", "2", "-o", healed, "-q")
    assert sorted(Checkpoint(healed).side_files()) == sorted(Checkpoint(cal).side_files())
    assert "gguf_metadata.gguf" in Checkpoint(healed).side_files()
    out = tmp_path / "healed.gguf"
    run("merge", healed, "-o", out, "-q")
    (source, meta_in), (merged, meta_out) = gm.contents(src), gm.contents(out)
    assert sorted(merged) == sorted(source) and meta_out.keys() == meta_in.keys()
    got = logits(transformers_model(out), IDS)
    want = logits(lors_convert.load(healed), IDS)
    assert (got - want).norm() / want.norm() <= 1e-5


@pytest.mark.parametrize("version", [2, 3])
def test_qwen_gguf_reads_exactly_and_merges_back(tmp_path, version):
    """Qwen2 (q/k/v biases) and Qwen3 (q/k norms) store every tensor as the model holds it."""
    from lors_convert.io.sources import open_lazy

    model = gm.qwen(version)
    src = gm.write(tmp_path / f"qwen{version}.gguf", model, "F32", arch=f"qwen{version}")
    meta, tensors, _ = open_lazy(src)
    assert type(meta).__name__ == f"Qwen{version}ForCausalLM"
    source = model.state_dict()
    assert set(tensors.keys()) == set(source) - {"lm_head.weight"}
    for key in tensors.keys():
        assert torch.equal(tensors.get(key), source[key]), key
    ckpt = tmp_path / "q.lors"
    run("convert", src, "--rank", "4", "-o", ckpt, "-q")
    out = tmp_path / "q.gguf"
    run("merge", ckpt, "-o", out, "-q")
    (before, meta_in), (after, meta_out) = gm.contents(src), gm.contents(out)
    assert sorted(after) == sorted(before) and meta_out.keys() == meta_in.keys()
    want = logits(lors_convert.load(ckpt), IDS)
    assert (logits(transformers_model(out), IDS) - want).norm() / want.norm() <= 1e-5
