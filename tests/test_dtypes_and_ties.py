"""Half-precision and tied sources through the CLI: dtypes and ties survive convert, merge and load.

fp16/bf16 weights are converted in float32 and written back in their dtype (a full-rank round trip
within the dtype's precision); a tied embedding and LM head stay one tensor in the checkpoint, in the
loaded model and in the merged model; merge writes exactly the source's keys for each kind of source.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import lors_convert
from lors_convert.checkpoint import Checkpoint
from tests.badcase import ARCH, ckpt_config, mlp_state, ok, run, set_config, write_weights


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_half_precision_sources_round_trip(dtype, tol, tmp_path):
    """Converted in float32, written back in the source dtype; full rank returns the source weights."""
    state = {k: v.to(dtype) for k, v in mlp_state().items()}
    src = write_weights(tmp_path / "w.safetensors", state)
    out = tmp_path / "out.lors"
    res = run("convert", src, "--arch", ARCH, "--rank", "full", "--keep-unsaving", "-o", out, "-q")
    assert res.exit_code == 0, res.output
    stored = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in stored.values()} == {dtype}
    res = run("merge", out, "-o", tmp_path / "m.safetensors", "-q")
    assert res.exit_code == 0, res.output
    dense = load_file(str(tmp_path / "m.safetensors"))
    assert dense.keys() == state.keys()
    for k, v in state.items():
        assert dense[k].dtype == dtype, k
        err = (dense[k].float() - v.float()).abs().max().item()
        assert err <= tol * v.float().abs().max().item(), (k, err)
    model = lors_convert.load(out, arch=ARCH)
    assert model.blocks[1].up.shared.dtype == dtype


def test_tied_embedding_and_lm_head_survive_convert_and_merge(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    src_model = GPT2LMHeadModel(config).eval()
    assert src_model.lm_head.weight is src_model.transformer.wte.weight
    src = tmp_path / "gpt2"
    src_model.save_pretrained(src)
    out = tmp_path / "gpt2.lors"
    res = run("convert", src, "--rank", "full", "--keep-unsaving", "-o", out, "-q")
    assert res.exit_code == 0, res.output
    config_json = json.loads((out / "lors_config.json").read_text())
    assert config_json["manifest"]["aliases"].get("lm_head.weight") == "transformer.wte.weight"
    assert "lm_head.weight" not in Checkpoint(out).keys()  # stored once

    lors_model = lors_convert.load(out)
    assert lors_model.lm_head.weight is lors_model.transformer.wte.weight

    res = run("merge", out, "-o", tmp_path / "dense", "-q")
    assert res.exit_code == 0, res.output
    dense = GPT2LMHeadModel.from_pretrained(str(tmp_path / "dense")).eval()
    assert dense.lm_head.weight.data_ptr() == dense.transformer.wte.weight.data_ptr()
    ref = src_model.state_dict()
    for k, v in dense.state_dict().items():
        assert (v - ref[k]).abs().max() <= 1e-5 * max(ref[k].abs().max().item(), 1e-12), k
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        a, b, c = (m(input_ids=ids).logits for m in (src_model, dense, lors_model))
    assert ((a - b).norm() / a.norm()) <= 1e-4 and ((a - c).norm() / a.norm()) <= 1e-4


def test_tied_keys_merge_once_for_every_source_kind(tmp_path):
    """Merge writes exactly the source's keys: a tied lm_head comes back once from an HF directory
    (as transformers saves it), under both names from a .pt state dict that stores both and from the
    Python API (the state dict is the source). (A GGUF source: tests/test_gguf.py, test_smollm2.py.)"""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=50,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "hf")
    file_keys = sorted(load_file(str(tmp_path / "hf" / "model.safetensors")))
    assert "lm_head.weight" not in file_keys
    ok("convert", tmp_path / "hf", "--rank", "full", "--keep-unsaving", "-o", tmp_path / "hf.lors", "-q")
    ok("merge", tmp_path / "hf.lors", "-o", tmp_path / "hf.safetensors", "-q")
    assert sorted(load_file(str(tmp_path / "hf.safetensors"))) == file_keys

    lors_model, report = lors_convert.convert(
        LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")), rank=None, require_savings=False
    )
    lors_convert.save(lors_model, tmp_path / "api.lors", report)
    ok("merge", tmp_path / "api.lors", "-o", tmp_path / "api.safetensors", "-q")
    assert sorted(load_file(str(tmp_path / "api.safetensors"))) == sorted(model.state_dict())

    config = ckpt_config(tmp_path / "hf.lors")  # a checkpoint from before stored_aliases
    del config["manifest"]["stored_aliases"]
    set_config(tmp_path / "hf.lors", config, metadata_too=True)
    ok("merge", tmp_path / "hf.lors", "-o", tmp_path / "old.safetensors", "-q")
    assert sorted(load_file(str(tmp_path / "old.safetensors"))) == sorted(
        model.state_dict()
    )  # as it did then

    torch.save(model.state_dict(), tmp_path / "both.pt")  # a state dict with both names of the tie
    ckpt = tmp_path / "pt.lors"
    ok(
        "convert",
        tmp_path / "both.pt",
        "--arch",
        "tests.models:tiny_tied_llama",
        "--rank",
        "full",
        "--keep-unsaving",
        "-o",
        ckpt,
        "-q",
    )
    assert Checkpoint(ckpt).manifest["stored_aliases"] == ["lm_head.weight"]
    ok("merge", ckpt, "-o", tmp_path / "pt.safetensors", "-q")
    both = load_file(str(tmp_path / "pt.safetensors"))
    assert sorted(both) == sorted(model.state_dict())
    assert torch.equal(both["lm_head.weight"], both["model.embed_tokens.weight"])
