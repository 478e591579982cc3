"""Bad model sources: files and directories ``convert`` and ``report`` cannot read as a model.

Empty, truncated and corrupt safetensors and PyTorch files, pickles that would run code (they never
do unless ``--trust-pickle`` is given), pickles that hold no model, NaN/Inf weights, state dicts that
do not fit ``--arch``, and Hugging Face directories with a weight missing or no safetensors file.
Each case must fail cleanly (see tests/badcase.py): one line, nothing written, inputs unchanged.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.badcase import (
    ARCH,
    Case,
    Evil,
    assert_clean_failure,
    case_ids,
    check_case,
    convert_args,
    grouped,
    in_path,
    make_file,
    mlp_state,
    run,
    torch_bytes,
    weights,
    weights_bytes,
    write_weights,
)
from tests.models import no_stacks


def _bad_header(kind: str) -> bytes:
    data = weights_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    if kind == "oversized":
        return struct.pack("<Q", 2**62) + data[8:]
    if kind == "beyond_eof":
        return struct.pack("<Q", len(data)) + data[8:]
    return data[:8] + b"{" + b"\x00" * (n - 1) + data[8 + n :]  # not JSON


def _evil(tmp: Path, name: str = "evil.pt", raw: bool = False) -> Path:
    payload = Evil(tmp / "marker")
    data = pickle.dumps(payload, protocol=2) if raw else torch_bytes(payload)
    return make_file(tmp, name, data)


def _nonfinite(key: str, value: float) -> dict:
    state = mlp_state()
    state[key][0, 0] = value
    return state


def _with_nonfinite(name: str, key: str, value: float):
    return lambda t: write_weights(in_path(t, name), _nonfinite(key, value))


def _hf_missing_weight(tmp: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    d = in_path(tmp, "gpt2")
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, n_positions=8)).save_pretrained(
        d
    )
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["transformer.h.0.attn.c_attn.weight"]
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def _hf_bin_only(tmp: Path) -> Path:
    d = in_path(tmp, "hfdir")
    d.mkdir()
    config = {
        "model_type": "gpt2",
        "n_layer": 2,
        "n_embd": 16,
        "n_head": 2,
        "vocab_size": 32,
        "n_positions": 8,
    }
    (d / "config.json").write_text(json.dumps(config))
    (d / "pytorch_model.bin").write_bytes(torch_bytes({"x": torch.zeros(2)}))
    return d


UNREADABLE = "not a readable safetensors"

SOURCES = grouped(
    "source",
    [
        Case("empty_pt", convert_args(lambda t: make_file(t, "empty.pt", b"")), 1, ("empty",)),
        Case(
            "empty_safetensors_arch",
            convert_args(lambda t: make_file(t, "e.safetensors", b""), "--arch", ARCH),
            1,
            ("empty",),
        ),
        Case(
            "truncated_safetensors",
            convert_args(lambda t: make_file(t, "t.safetensors", weights_bytes()[:3000]), "--arch", ARCH),
            1,
            (UNREADABLE,),
        ),
        Case(
            "truncated_safetensors_no_arch",
            convert_args(lambda t: make_file(t, "t.safetensors", weights_bytes()[:3000])),
            1,
            (UNREADABLE,),
        ),
        Case(
            "header_oversized",
            convert_args(lambda t: make_file(t, "h.safetensors", _bad_header("oversized")), "--arch", ARCH),
            1,
            (UNREADABLE, "header"),
        ),
        Case(
            "header_beyond_eof",
            convert_args(lambda t: make_file(t, "h.safetensors", _bad_header("beyond_eof")), "--arch", ARCH),
            1,
            (UNREADABLE,),
        ),
        Case(
            "header_corrupted",
            convert_args(lambda t: make_file(t, "h.safetensors", _bad_header("json")), "--arch", ARCH),
            1,
            (UNREADABLE,),
        ),
        Case(
            "random_bytes_pt",
            convert_args(lambda t: make_file(t, "r.pt", os.urandom(4096))),
            1,
            ("not a readable PyTorch file",),
        ),
        Case(
            "random_bytes_pt_arch",
            convert_args(lambda t: make_file(t, "r.pt", os.urandom(4096)), "--arch", ARCH),
            1,
            ("not a readable PyTorch file",),
        ),
        Case(
            "malicious_pickle",
            convert_args(_evil),
            1,
            ("refused to unpickle", "runs code", "--trust-pickle"),
            marker=True,
        ),
        Case(
            "malicious_raw_pickle",
            convert_args(lambda t: _evil(t, "raw.pkl", raw=True)),
            1,
            ("refused to unpickle", "runs code", "--trust-pickle"),
            marker=True,
        ),
        Case(
            "malicious_pickle_arch",
            convert_args(_evil, "--arch", ARCH),
            1,
            ("refused to unpickle", "runs code"),
            marker=True,
        ),
        Case(
            "malicious_pickle_report",
            lambda t: ["report", _evil(t)],
            1,
            ("refused to unpickle", "--trust-pickle"),
            marker=True,
        ),
        Case(
            "pickle_dict_of_strings",
            convert_args(lambda t: make_file(t, "d.pt", torch_bytes({"a": "b", "c": "d"}))),
            1,
            ("expected a model or a state dict", "dict of str"),
        ),
        Case(
            "pickle_dict_of_strings_arch",
            convert_args(lambda t: make_file(t, "d.pt", torch_bytes({"a": "b"})), "--arch", ARCH),
            1,
            ("expected a state dict",),
        ),
        Case(
            "pickle_list",
            convert_args(lambda t: make_file(t, "l.pt", torch_bytes([1, "two", 3.0]))),
            1,
            ("expected a model or a state dict", "list"),
        ),
        Case(
            "no_stacks",
            convert_args(
                lambda t: write_weights(in_path(t, "n.safetensors"), no_stacks().state_dict()),
                "--arch",
                "tests.models:no_stacks",
            ),
            1,
            ("no stacks found: searched 4 modules",),
        ),
        Case(
            "nan_in_stacked_weight",
            convert_args(
                _with_nonfinite("nan.safetensors", "blocks.2.up.weight", float("nan")), "--arch", ARCH
            ),
            1,
            ("blocks.2.up.weight", "NaN"),
        ),
        Case(
            "inf_in_stacked_weight",
            convert_args(
                _with_nonfinite("inf.safetensors", "blocks.0.down.weight", float("-inf")), "--arch", ARCH
            ),
            1,
            ("blocks.0.down.weight", "Inf"),
        ),
        Case(
            "inf_in_untouched_weight",
            convert_args(_with_nonfinite("inf.safetensors", "head.weight", float("inf")), "--arch", ARCH),
            1,
            ("head.weight", "Inf"),
        ),
        Case(
            "state_dict_wrong_keys_for_arch",
            convert_args(weights, "--arch", "tests.models:no_stacks"),
            1,
            ("does not match --arch",),
        ),
        Case(
            "state_dict_wrong_shapes_for_arch",
            convert_args(
                lambda t: write_weights(in_path(t, "h48.safetensors"), mlp_state(hidden=48)), "--arch", ARCH
            ),
            1,
            ("blocks.0.up.weight", "shape [48, 32]"),
        ),
        Case(
            "hf_dir_missing_weight",
            convert_args(_hf_missing_weight),
            1,
            ("transformer.h.0.attn.c_attn.weight", "missing", "randomly"),
        ),
        Case(
            "arch_not_a_module",
            convert_args(weights, "--arch", "builtins:dict"),
            1,
            ("not a torch nn.Module",),
            names="builtins:dict",
        ),
        Case("hf_dir_without_safetensors", convert_args(_hf_bin_only), 1, ("model.safetensors",)),
    ],
)


@pytest.mark.parametrize("case", SOURCES, ids=case_ids(SOURCES))
def test_bad_source(case: Case, tmp_path):
    check_case(case, tmp_path)


def test_trusted_pickle_runs_only_with_the_flag(tmp_path):
    """Without --trust-pickle the payload never runs; with it, it runs, then a clean 'not a model'."""
    (tmp_path / "in").mkdir()
    src = _evil(tmp_path)
    out = tmp_path / "out.lors"
    for command in (["convert", src, "-o", out], ["report", src]):
        res = run(*command)
        assert_clean_failure(res, 1, ("refused", "--trust-pickle"), str(src))
        assert not (tmp_path / "marker").exists()
    res = run("convert", src, "-o", out, "--trust-pickle")
    assert (tmp_path / "marker").exists(), "with --trust-pickle the file is unpickled"
    assert_clean_failure(res, 1, ("expected a model or a state dict", "int"), str(src))
    assert not out.exists()
