"""``lors convert --hf-code``: transformers alone loads the checkpoint (``trust_remote_code=True``), in a
process where lors cannot be imported, and computes what ``lors.load`` computes."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import lors_convert
from lors_convert.checkpoint.hf_code import MODELING_NAME, modeling_source, write_hf_code
from lors_convert.cli import app
from lors_convert.layers import LorsConv1D, LorsLayer, LorsLinear
from tests.clirun import run_ok, runner
from tests.models import gpt2, llama
from tests.test_deploy_load import bert_with_pooler, hf_dir

IDS = torch.randint(5, 100, (2, 7), generator=torch.Generator().manual_seed(3))

# run with -I: no PYTHONPATH, no user site; the editable install's finder is refused as well
CHILD = r"""
import json, sys
class NoLors:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "lors_convert":
            raise ImportError("lors_convert is not importable here")
sys.meta_path.insert(0, NoLors())
try:
    import lors_convert
except ImportError:
    pass
else:
    raise SystemExit("lors_convert was importable")
import torch, transformers
from safetensors.torch import load_file, save_file
jobs, ids_file, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
ids = load_file(ids_file)["ids"]
results, names = {}, {}
for name, auto, path in jobs:
    model = getattr(transformers, auto).from_pretrained(path, trust_remote_code=True)
    names[name] = type(model).__name__
    with torch.no_grad():
        o = model(input_ids=ids)
        results[name] = (o.logits if hasattr(o, "logits") else o.last_hidden_state).contiguous()
        if hasattr(model, "generate") and model.can_generate():
            results[name + ".generated"] = model.generate(ids[:1], max_new_tokens=5, min_new_tokens=5,
                                                          do_sample=False, pad_token_id=0)
save_file(results, out)
print(json.dumps({"classes": names, "lors_imported": "lors_convert" in sys.modules}))
"""


def output(model) -> torch.Tensor:
    with torch.no_grad():
        o = model(input_ids=IDS)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def test_hf_code_checkpoints_load_without_lors_and_match_lors_load(tmp_path):
    jobs, expected = [], {}
    for name, build, auto, args in (
        ("llama", llama, "AutoModelForCausalLM", ["--rank", "4"]),
        ("gpt2", gpt2, "AutoModelForCausalLM", ["--budget", "0.5", "--sharing", "never"]),  # private-only
        ("bert", bert_with_pooler, "AutoModel", ["--rank", "4"]),
    ):
        src = hf_dir(tmp_path / name, build, tokenizer_files=name != "gpt2")  # gpt2: budget, uncalibrated
        ckpt = tmp_path / f"{name}.lors"
        run_ok("convert", src, *args, "-o", ckpt, "-q", "--no-fidelity", "--hf-code")
        config = json.loads((ckpt / "config.json").read_text())
        assert config["auto_map"]["AutoModel"] == "modeling_lors.LorsModel"
        assert (auto in config["auto_map"]) and (ckpt / MODELING_NAME).read_text() == modeling_source()
        model = lors_convert.load(ckpt)
        expected[name] = output(model)
        if name != "bert":
            expected[name + ".generated"] = model.generate(
                IDS[:1], max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0
            )
        jobs.append((name, auto, str(ckpt)))
    save_file({"ids": IDS}, str(tmp_path / "ids.safetensors"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    args = [json.dumps(jobs), str(tmp_path / "ids.safetensors"), str(tmp_path / "out.safetensors")]
    proc = subprocess.run(
        [sys.executable, "-I", "-c", CHILD, *args], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info == {
        "classes": {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel", "bert": "BertModel"},
        "lors_imported": False,
    }
    got = load_file(str(tmp_path / "out.safetensors"))
    assert got.keys() == expected.keys()
    for key, want in expected.items():
        if key.endswith(".generated"):
            assert torch.equal(got[key], want), key
        else:
            assert (got[key] - want).abs().max() <= 1e-5 * want.abs().max(), key


def test_the_modeling_file_is_the_library_layer_code():
    text = modeling_source()
    for cls in (LorsLayer, LorsLinear, LorsConv1D):
        assert inspect.getsource(cls) in text
    assert "from lors_convert" not in text and "import lors_convert" not in text
    compile(text, MODELING_NAME, "exec")


def test_hf_code_refuses_sources_transformers_cannot_build(tmp_path):
    from tests.models import StackedMLP

    save_file(StackedMLP().state_dict(), str(tmp_path / "mlp.safetensors"))
    mlp = str(tmp_path / "mlp.safetensors")
    res = runner.invoke(
        app, ["convert", mlp, "--arch", "tests.models:StackedMLP", "--hf-code", "-o", str(tmp_path / "out")]
    )
    assert res.exit_code == 2, res.output
    assert "--hf-code needs a Hugging Face directory or GGUF source" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    run_ok("convert", mlp, "--arch", "tests.models:StackedMLP", "-o", tmp_path / "m", "-q")
    with pytest.raises(lors_convert.LorsUsageError, match="needs a checkpoint of a transformers model"):
        write_hf_code(tmp_path / "m")
    assert not (tmp_path / "m" / MODELING_NAME).exists()


def test_merge_of_an_hf_code_checkpoint_is_a_plain_transformers_directory(tmp_path):
    from transformers import AutoModelForCausalLM

    src = hf_dir(tmp_path, llama, tokenizer_files=False)
    run_ok("convert", src, "--rank", "4", "-o", tmp_path / "c.lors", "-q", "--no-fidelity", "--hf-code")
    run_ok("merge", tmp_path / "c.lors", "-o", tmp_path / "dense", "-q")
    assert not (tmp_path / "dense" / MODELING_NAME).exists()
    assert "auto_map" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", trust_remote_code=True)
    want = output(lors_convert.load(tmp_path / "c.lors"))
    assert (output(dense) - want).abs().max() <= 1e-4 * want.abs().max()
