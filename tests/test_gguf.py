"""GGUF in and out (issue 18) on tiny Llama files written as llama.cpp writes them (tests/gguf_models.py).

Reading is checked against the model the file was written from (exact for F32) and against
transformers' own GGUF loader; conversion and merge round trips against the dequantized source.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import lors_convert
from lors_convert.checkpoint import Checkpoint
from lors_convert.cli import app

pytest.importorskip("gguf")
from tests import gguf_models as gm  # noqa: E402  (needs gguf)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
runner = CliRunner()


def run(*args):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, (res.exit_code, res.stderr, repr(res.exception))
    return res


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """The source model (tied) and its GGUF as F32 and Q8_0, an untied one with a rope_freqs tensor."""
    d = tmp_path_factory.mktemp("gguf")
    tied, untied = gm.llama(tied=True), gm.llama(tied=False, seed=1)
    rope = np.linspace(1.0, 4.0, 8, dtype=np.float32)  # llama.cpp's rope scaling factors: no place in the model
    return {"model": tied, "untied_model": untied, "dir": d,
            "F32": gm.write(d / "tiny-f32.gguf", tied, "F32"),
            "Q8_0": gm.write(d / "tiny-q8.gguf", tied, "Q8_0"),
            "untied": gm.write(d / "untied-q4.gguf", untied, "Q4_1", extra={"rope_freqs.weight": (rope, "F32")})}


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
    assert model.lm_head.weight is model.model.embed_tokens.weight and info.sha256
    assert torch.equal(logits(model, IDS), logits(transformers_model(path), IDS))


def test_convert_then_merge_to_a_transformers_directory(files, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = files["Q8_0"]
    ckpt = tmp_path / "q8.lors"
    run("convert", src, "--rank", "full", "--keep-unsaving", "-o", ckpt, "-q")
    config = Checkpoint(ckpt).config
    assert config["source"]["kind"] == "gguf" and config["manifest"]["aliases"] == {
        "lm_head.weight": "model.embed_tokens.weight"} and config["manifest"]["stored_aliases"] == []
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
    assert AutoTokenizer.from_pretrained(str(tmp_path / "dense"))(text)["input_ids"] == \
        AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)(text)["input_ids"]


def test_report_projects_a_gguf_source(files):
    res = run("report", files["Q8_0"], "--ranks", "4,8", "--json")
    sweep = json.loads(res.stdout)
    assert [row["rank"] for row in sweep["ranks"]] == [4, 8]
