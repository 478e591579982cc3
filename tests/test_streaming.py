"""Streaming conversion: equal to the in-memory path, sharded output, torchrun ranks, AdaMixer via CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import lors_convert
from lors_convert.checkpoint import Checkpoint, save, source_manifest
from lors_convert.cli import app
from lors_convert.io.sources import load_source
from tests.models import StackedMLP

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint(path)
    return {k: ckpt.get(k) for k in ckpt.keys()}


@pytest.fixture()
def gpt2_dir(tmp_path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            n_layer=3, n_embd=64, n_head=4, vocab_size=128, n_positions=32, bos_token_id=0, eos_token_id=0
        )
    )
    model.save_pretrained(tmp_path / "gpt2")
    return tmp_path / "gpt2"


def test_streaming_equals_in_memory(gpt2_dir, tmp_path):
    from lors_convert.checkpoint.format import stored_manifest
    from lors_convert.io.sources import open_lazy

    meta, tensors, _ = open_lazy(gpt2_dir, None)  # the tied lm_head must survive the meta build,
    assert meta.lm_head.weight is meta.transformer.wte.weight  # else the CLI silently loads it whole
    streamable = stored_manifest(source_manifest(meta), tensors)  # None: the model must be loaded whole
    assert streamable["aliases"] == {"lm_head.weight": "transformer.wte.weight"}
    assert streamable["stored_aliases"] == []  # transformers stores the tied head once, as wte
    assert sorted(set(streamable["keys"]) - set(streamable["aliases"])) == sorted(tensors.keys())
    res = runner.invoke(app, ["convert", str(gpt2_dir), "--rank", "8", "-o", str(tmp_path / "s.lors"), "-q"])
    assert res.exit_code == 0, res.output
    model, source = load_source(gpt2_dir)
    manifest = source_manifest(model, source.stored)  # the file's names: the tied lm_head is not among them
    lors_model, report = lors_convert.convert(model, rank=8)
    save(lors_model, tmp_path / "m.lors", report, source, manifest)
    streamed, in_memory = _tensors(tmp_path / "s.lors"), _tensors(tmp_path / "m.lors")
    assert streamed.keys() == in_memory.keys()
    for k in streamed:
        assert torch.equal(streamed[k], in_memory[k]), k
    a, b = Checkpoint(tmp_path / "s.lors"), Checkpoint(tmp_path / "m.lors")
    assert a.manifest == b.manifest
    assert a.manifest["aliases"] == {"lm_head.weight": "transformer.wte.weight"}  # the tie is recorded
    assert a.report().to_dict()["total"] == b.report().to_dict()["total"]
    # the streamed hash runs on a thread beside the skeleton build; both paths record the file's sha256
    expected = hashlib.sha256((gpt2_dir / "model.safetensors").read_bytes()).hexdigest()
    assert a.config["source"]["sha256"] == b.config["source"]["sha256"] == expected


def test_digest_waits_cancels_and_reports_errors(tmp_path):
    from lors_convert.io.digest import CHUNK_BYTES, Digest

    parts = [tmp_path / "b.bin", tmp_path / "a.bin"]
    for i, p in enumerate(parts):
        p.write_bytes(bytes([i]) * (CHUNK_BYTES + 7))
    whole = hashlib.sha256(parts[1].read_bytes() + parts[0].read_bytes()).hexdigest()  # sorted by path
    assert Digest(parts).result() == whole
    cancelled = Digest(parts)
    cancelled.cancel()
    with pytest.raises(RuntimeError, match="cancelled"):
        cancelled.result()
    with pytest.raises(FileNotFoundError):  # raised in the caller's thread, not lost on the worker
        Digest([tmp_path / "missing.bin"]).result()


def test_sharded_output_round_trip(gpt2_dir, tmp_path):
    from transformers import GPT2LMHeadModel

    out = tmp_path / "sharded.lors"
    res = runner.invoke(
        app,
        [
            "convert",
            str(gpt2_dir),
            "--rank",
            "full",
            "--keep-unsaving",
            "--max-shard-size",
            "60KB",
            "-o",
            str(out),
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and all((out / s).is_file() for s in shards)
    assert not (out / "model.safetensors").exists()
    res = runner.invoke(
        app, ["merge", str(out), "-o", str(tmp_path / "dense"), "--max-shard-size", "60KB", "-q"]
    )
    assert res.exit_code == 0, res.output
    src = GPT2LMHeadModel.from_pretrained(str(gpt2_dir)).state_dict()
    merged = GPT2LMHeadModel.from_pretrained(str(tmp_path / "dense"))
    assert merged.lm_head.weight is merged.transformer.wte.weight  # tie preserved through merge
    for k, v in merged.state_dict().items():
        assert (v - src[k]).abs().max() <= 1e-5 * src[k].abs().max().clamp_min(1e-12), k
    model = lors_convert.load(out)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.transformer.h[0].attn.c_attn.shared is model.transformer.h[2].attn.c_attn.shared


def test_config_without_architectures_keeps_the_head(tmp_path):
    """A checkpoint saved from a bare config has no ``architectures``: AutoModel would drop lm_head."""
    from safetensors.torch import save_file as save_st
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=50,
        tie_word_embeddings=False,
    )
    src = tmp_path / "bare"
    src.mkdir()
    config.save_pretrained(src)
    assert json.loads((src / "config.json").read_text()).get("architectures") is None
    state = {k: v.contiguous() for k, v in LlamaForCausalLM(config).state_dict().items()}
    save_st(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "bare.lors"
    res = runner.invoke(app, ["convert", str(src), "--rank", "full", "--keep-unsaving", "-o", str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert Checkpoint(out).source["arch"] == "LlamaForCausalLM"
    res = runner.invoke(app, ["merge", str(out), "-o", str(tmp_path / "dense"), "-q"])
    assert res.exit_code == 0, res.output
    merged = load_file(str(tmp_path / "dense" / "model.safetensors"))
    assert merged.keys() == state.keys()  # lm_head and the "model." prefix kept
    for k, v in state.items():
        assert (merged[k] - v).abs().max() <= 1e-5 * v.abs().max().clamp_min(1e-12), k
    assert type(lors_convert.load(out)).__name__ == "LlamaForCausalLM"


def test_torchrun_two_processes_identical(tmp_path):
    torch.manual_seed(0)
    src = tmp_path / "mlp.safetensors"
    save_file(StackedMLP(dim=48, hidden=96, depth=6).state_dict(), str(src))
    args = [
        str(src),
        "--arch",
        "tests.models:stacked_mlp_wide",
        "--rank",
        "4",
        "--max-shard-size",
        "20KB",
        "-q",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, "-m", "lors_convert", "convert", *args, "-o", str(tmp_path / "one")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr
    dist = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "lors_convert",
            "convert",
            *args,
            "-o",
            str(tmp_path / "two"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert dist.returncode == 0, dist.stderr[-2000:]
    one, two = tmp_path / "one", tmp_path / "two"
    files = sorted(p.name for p in one.iterdir())
    assert files == sorted(p.name for p in two.iterdir())
    assert sum(f.endswith(".safetensors") for f in files) >= 2  # several shards, split across the ranks
    assert _digests(one) == _digests(two)  # byte-identical files


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_every_conversion_path_writes_the_same_checkpoint(tmp_path):
    """In memory (Python API + save), streamed (.safetensors + --arch), loaded whole (a pickled module) and
    TorchScript: one loop, so the same tensors; the first two record the same source, so the same bytes."""
    torch.manual_seed(0)
    model = StackedMLP()
    src = tmp_path / "mlp.safetensors"
    save_file(model.state_dict(), str(src))
    arch = "tests.models:stacked_mlp"
    res = runner.invoke(
        app,
        [
            "convert",
            str(src),
            "--arch",
            arch,
            "--rank",
            "4",
            "-o",
            str(tmp_path / "s.lors"),
            "-q",
            "--no-fidelity",
        ],
    )  # the Python API measures nothing either
    assert res.exit_code == 0, res.output
    dense, source = load_source(src, arch=arch)
    manifest = source_manifest(dense)
    lors_model, report = lors_convert.convert(dense, rank=4)
    save(lors_model, tmp_path / "m.lors", report, source, manifest)
    assert _digests(tmp_path / "s.lors") == _digests(tmp_path / "m.lors")

    torch.save(StackedMLP(), tmp_path / "whole.pt")  # other weights, same structure: reload ours into it
    whole = torch.load(tmp_path / "whole.pt", weights_only=False)
    whole.load_state_dict(model.state_dict())
    torch.save(whole, tmp_path / "whole.pt")
    torch.jit.script(whole).save(str(tmp_path / "scripted.pt"))
    outputs = {}
    for name, extra in (("pickle", ["--trust-pickle"]), ("torchscript", [])):
        source_file = tmp_path / ("whole.pt" if name == "pickle" else "scripted.pt")
        res = runner.invoke(
            app,
            [
                "convert",
                str(source_file),
                "--rank",
                "4",
                "-o",
                str(tmp_path / f"{name}.lors"),
                "-q",
                "--no-fidelity",
                *extra,
            ],
        )
        assert res.exit_code == 0, res.output
        outputs[name] = tmp_path / f"{name}.lors"
    reference = Checkpoint(tmp_path / "s.lors")
    for name, path in outputs.items():
        ckpt = Checkpoint(path)
        assert ckpt.source["kind"] == name
        assert {k: v for k, v in ckpt.config.items() if k != "source"} == {
            k: v for k, v in reference.config.items() if k != "source"
        }, name
        assert sorted(ckpt.keys()) == sorted(reference.keys()), name
        for key in reference.keys():
            assert torch.equal(ckpt.get(key), reference.get(key)), (name, key)
        assert (path / "report.json").read_bytes() == (tmp_path / "s.lors" / "report.json").read_bytes(), name


def test_adamixer_via_cli(tmp_path):
    from lors_convert.zoo.adamixer import build_tiny

    torch.manual_seed(0)
    dense = build_tiny().eval()
    src = tmp_path / "decoder.safetensors"
    save_file(dense.state_dict(), str(src))
    arch = "lors_convert.zoo.adamixer:build_tiny"
    full = tmp_path / "full.lors"
    res = runner.invoke(
        app,
        [
            "convert",
            str(src),
            "--arch",
            arch,
            "--adaptive",
            "auto",
            "--rank",
            "full",
            "--keep-unsaving",
            "-o",
            str(full),
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    kinds = {m["kind"] for s in json.loads(res.stdout)["stacks"] for m in s["matrices"]}
    assert kinds == {"static", "adaptive"}
    res = runner.invoke(app, ["merge", str(full), "-o", str(tmp_path / "full.safetensors"), "-q"])
    assert res.exit_code == 0, res.output
    merged = load_file(str(tmp_path / "full.safetensors"))
    assert merged.keys() == dense.state_dict().keys()
    for k, v in dense.state_dict().items():
        assert (merged[k] - v).abs().max() <= 1e-5 * v.abs().max().clamp_min(1e-12), k

    paper = tmp_path / "paper.lors"
    res = runner.invoke(
        app, ["convert", str(src), "--arch", arch, "--preset", "adamixer-paper", "-o", str(paper), "-q"]
    )
    assert res.exit_code == 0, res.output
    model = lors_convert.load(paper)
    kinds = {type(m).__name__ for m in model.modules() if isinstance(m, lors_convert.layers.LorsModule)}
    assert kinds == {"LorsaLinear", "LorsLinear"}
    via_module = lors_convert.merge(model).state_dict()
    res = runner.invoke(app, ["merge", str(paper), "-o", str(tmp_path / "paper.safetensors"), "-q"])
    assert res.exit_code == 0, res.output
    via_tensors = load_file(str(tmp_path / "paper.safetensors"))
    assert via_tensors.keys() == via_module.keys()
    for k, v in via_tensors.items():
        assert (v - via_module[k]).abs().max() <= 1e-6 * v.abs().max().clamp_min(1e-12), k
