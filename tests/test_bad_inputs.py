"""Bad inputs (issues 7 and 19): every one gets a clear error, nothing is lost, nothing runs that should not.

Each table case runs one ``lors`` command and checks: exit code 1 (runtime) or 2 (usage), exactly one
line on stderr that names the problem (and the file, where a file is the problem), no traceback and
no warning, nothing new on disk (no output, no hidden ``.NAME.tmp-*`` leftover) and every input
byte-identical. Groups: source (model files), usage (flags), paths, calibration (files given to
``--calibrate``/``--heldout``/``--data``), confined (names and links leading out of a directory),
heal_state (a state that must not be resumed) and outputs (an output onto an input).
Then: the pickle payload proof, rank clamping, fp16/bf16, tied weights, SIGKILL mid-write, tampered
checkpoints against report/merge/load, a mismatching architecture, and a bounded fuzz of the reader.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import lors_convert
from lors_convert.checkpoint import Checkpoint, merge_checkpoint
from lors_convert.cli import app
from lors_convert.errors import LorsError
from tests.archs import StackedMLP, no_stacks

os.environ.setdefault("HF_HUB_OFFLINE", "1")
runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent
ARCH = "tests.archs:stacked_mlp"


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def tree_state(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (hidden ones included) with the sha256 of its content."""
    state = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        state[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return state


def one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{text}"
    return lines[0]


def assert_clean_failure(res, code: int, words: tuple[str, ...], names: str | None) -> str:
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output and "Traceback" not in res.stderr
    assert res.exit_code == code, (res.exit_code, res.stderr)
    line = one_line(res.stderr)
    assert line.startswith("error: "), line
    for w in words:
        assert w in line, (w, line)
    if names is not None:
        assert names in line, (names, line)
    return line


# ---------------------------------------------------------------------------------------------
# inputs the table builds from


def mlp_state(seed: int = 0, **kw) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in StackedMLP(**kw).state_dict().items()}


def write_weights(path: Path, state=None) -> Path:
    save_file(state if state is not None else mlp_state(), str(path))
    return path


class Evil:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@dataclass
class Case:
    id: str
    build: Callable[[Path], list]  # tmp -> command args (the output is added as -o tmp/out...)
    code: int
    words: tuple[str, ...]
    names: str | None = "{input}"  # what the message must name; None for pure option errors
    out: str = "out.lors"
    marker: bool = False  # a pickle payload that must not run
    group: str = "source"  # what kind of input is wrong (the table is counted by group)


def _input(tmp: Path, name: str) -> Path:
    return tmp / "in" / name


def _mk(tmp: Path, name: str, data: bytes) -> Path:
    p = _input(tmp, name)
    p.write_bytes(data)
    return p


def _weights_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        return write_weights(Path(d) / "w.safetensors").read_bytes()


def _bad_header(kind: str) -> bytes:
    data = _weights_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    if kind == "oversized":
        return struct.pack("<Q", 2**62) + data[8:]
    if kind == "beyond_eof":
        return struct.pack("<Q", len(data)) + data[8:]
    return data[:8] + b"{" + b"\x00" * (n - 1) + data[8 + n :]  # not JSON


def _torch_bytes(obj) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        torch.save(obj, Path(d) / "x.pt")
        return (Path(d) / "x.pt").read_bytes()


def _evil(tmp: Path, name: str = "evil.pt", raw: bool = False) -> Path:
    payload = Evil(tmp / "marker")
    data = pickle.dumps(payload, protocol=2) if raw else _torch_bytes(payload)
    return _mk(tmp, name, data)


def _nonfinite(key: str, value: float) -> dict:
    state = mlp_state()
    state[key][0, 0] = value
    return state


def _convert(src_builder, *extra) -> Callable[[Path], list]:
    return lambda tmp: ["convert", src_builder(tmp), *extra]


def _w(tmp: Path) -> Path:
    return write_weights(_input(tmp, "w.safetensors"))


CASES = [
    Case("missing_file", _convert(lambda t: _input(t, "missing.pt")), 2, ("no such file",)),
    Case("missing_file_report", lambda t: ["report", _input(t, "missing.lors")], 2, ("no such file",)),
    Case(
        "missing_file_merge",
        lambda t: ["merge", _input(t, "missing.lors")],
        2,
        ("no such file",),
        out="merged",
    ),
    Case("empty_pt", _convert(lambda t: _mk(t, "empty.pt", b"")), 1, ("empty",)),
    Case(
        "empty_safetensors_arch",
        _convert(lambda t: _mk(t, "e.safetensors", b""), "--arch", ARCH),
        1,
        ("empty",),
    ),
    Case(
        "truncated_safetensors",
        _convert(lambda t: _mk(t, "t.safetensors", _weights_bytes()[:3000]), "--arch", ARCH),
        1,
        ("not a readable safetensors",),
    ),
    Case(
        "truncated_safetensors_no_arch",
        _convert(lambda t: _mk(t, "t.safetensors", _weights_bytes()[:3000])),
        1,
        ("not a readable safetensors",),
    ),
    Case(
        "header_oversized",
        _convert(lambda t: _mk(t, "h.safetensors", _bad_header("oversized")), "--arch", ARCH),
        1,
        ("not a readable safetensors", "header"),
    ),
    Case(
        "header_beyond_eof",
        _convert(lambda t: _mk(t, "h.safetensors", _bad_header("beyond_eof")), "--arch", ARCH),
        1,
        ("not a readable safetensors",),
    ),
    Case(
        "header_corrupted",
        _convert(lambda t: _mk(t, "h.safetensors", _bad_header("json")), "--arch", ARCH),
        1,
        ("not a readable safetensors",),
    ),
    Case(
        "random_bytes_pt",
        _convert(lambda t: _mk(t, "r.pt", os.urandom(4096))),
        1,
        ("not a readable PyTorch file",),
    ),
    Case(
        "random_bytes_pt_arch",
        _convert(lambda t: _mk(t, "r.pt", os.urandom(4096)), "--arch", ARCH),
        1,
        ("not a readable PyTorch file",),
    ),
    Case(
        "malicious_pickle",
        _convert(_evil),
        1,
        ("refused to unpickle", "runs code", "--trust-pickle"),
        marker=True,
    ),
    Case(
        "malicious_raw_pickle",
        _convert(lambda t: _evil(t, "raw.pkl", raw=True)),
        1,
        ("refused to unpickle", "runs code", "--trust-pickle"),
        marker=True,
    ),
    Case(
        "malicious_pickle_arch",
        _convert(_evil, "--arch", ARCH),
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
        _convert(lambda t: _mk(t, "d.pt", _torch_bytes({"a": "b", "c": "d"}))),
        1,
        ("expected a model or a state dict", "dict of str"),
    ),
    Case(
        "pickle_dict_of_strings_arch",
        _convert(lambda t: _mk(t, "d.pt", _torch_bytes({"a": "b"})), "--arch", ARCH),
        1,
        ("expected a state dict",),
    ),
    Case(
        "pickle_list",
        _convert(lambda t: _mk(t, "l.pt", _torch_bytes([1, "two", 3.0]))),
        1,
        ("expected a model or a state dict", "list"),
    ),
    Case(
        "no_stacks",
        _convert(
            lambda t: write_weights(_input(t, "n.safetensors"), no_stacks().state_dict()),
            "--arch",
            "tests.archs:no_stacks",
        ),
        1,
        ("no stacks found", "searched 4 modules"),
    ),
    Case(
        "include_matches_nothing",
        _convert(_w, "--arch", ARCH, "--include", "*nothing*"),
        2,
        ("*nothing*", "matches no"),
    ),
    Case("exclude_everything", _convert(_w, "--arch", ARCH, "--exclude", "*"), 2, ("no stacked parameter",)),
    Case("rank_zero", _convert(_w, "--arch", ARCH, "--rank", "0"), 2, ("--rank", "positive"), names=None),
    Case("rank_negative", _convert(_w, "--arch", ARCH, "--rank", "-3"), 2, ("--rank", "-3"), names=None),
    Case(
        "rank_not_a_number",
        _convert(_w, "--arch", ARCH, "--rank", "eight"),
        2,
        ("--rank", "eight"),
        names=None,
    ),
    Case(
        "groups_wrong_length",
        _convert(_w, "--arch", ARCH, "--groups", "1,2"),
        2,
        ("groups has 2 entries", "4 layers"),
    ),
    Case("groups_zero", _convert(_w, "--arch", ARCH, "--groups", "1,0,1,1"), 2, ("--groups",), names=None),
    Case(
        "nan_in_stacked_weight",
        _convert(
            lambda t: write_weights(
                _input(t, "nan.safetensors"), _nonfinite("blocks.2.up.weight", float("nan"))
            ),
            "--arch",
            ARCH,
        ),
        1,
        ("blocks.2.up.weight", "NaN"),
    ),
    Case(
        "inf_in_stacked_weight",
        _convert(
            lambda t: write_weights(
                _input(t, "inf.safetensors"), _nonfinite("blocks.0.down.weight", float("-inf"))
            ),
            "--arch",
            ARCH,
        ),
        1,
        ("blocks.0.down.weight", "Inf"),
    ),
    Case(
        "inf_in_untouched_weight",
        _convert(
            lambda t: write_weights(_input(t, "inf.safetensors"), _nonfinite("head.weight", float("inf"))),
            "--arch",
            ARCH,
        ),
        1,
        ("head.weight", "Inf"),
    ),
    Case(
        "state_dict_wrong_keys_for_arch",
        _convert(_w, "--arch", "tests.archs:no_stacks"),
        1,
        ("does not match --arch",),
    ),
    Case(
        "state_dict_wrong_shapes_for_arch",
        _convert(lambda t: write_weights(_input(t, "h48.safetensors"), mlp_state(hidden=48)), "--arch", ARCH),
        1,
        ("blocks.0.up.weight", "shape [48, 32]"),
    ),
    Case(
        "hf_dir_missing_weight",
        _convert(lambda t: _hf_missing_weight(t)),
        1,
        ("transformer.h.0.attn.c_attn.weight", "missing", "randomly"),
    ),
    Case(
        "arch_not_a_module",
        _convert(_w, "--arch", "builtins:dict"),
        1,
        ("not a torch nn.Module",),
        names="builtins:dict",
    ),
    Case("hf_dir_without_safetensors", _convert(lambda t: _hf_bin_only(t)), 1, ("model.safetensors",)),
    # GGUF (issue 18): the header, the tensor table and the metadata must agree with each other and the file
    Case("gguf_truncated", _convert(lambda t: _gguf_cut(t, 0.6)), 1, ("truncated",)),
    Case("gguf_truncated_header", _convert(lambda t: _gguf_cut(t, 0.01)), 1, ("truncated or corrupt",)),
    Case("gguf_empty", _convert(lambda t: _mk(t, "e.gguf", b"")), 1, ("not a GGUF file", "empty")),
    Case(
        "gguf_wrong_magic",
        _convert(lambda t: _mk(t, "m.gguf", b"GGUX" + _gguf_bytes(t)[4:])),
        1,
        ("not a GGUF file", "b'GGUX'"),
    ),
    Case(
        "gguf_wrong_magic_report",
        lambda t: ["report", _mk(t, "m.gguf", b"GGML" + _gguf_bytes(t)[4:])],
        1,
        ("not a GGUF file",),
    ),
    Case(
        "gguf_unsupported_architecture",
        _convert(lambda t: _gguf(t, arch="gpt2")),
        1,
        ("GGUF architecture 'gpt2' is not supported", "llama"),
    ),
    Case(
        "gguf_tensor_count_beyond_table", _convert(lambda t: _gguf_tensor_count(t, +1)), 1, ("corrupt GGUF",)
    ),  # the reader parses tensor data as a table entry: where it fails depends on the bytes
    Case(
        "gguf_tensor_count_short_of_table",
        _convert(lambda t: _gguf_tensor_count(t, -1)),
        1,
        ("corrupt GGUF", "tensor count"),
    ),
    Case(
        "gguf_block_missing",
        _convert(lambda t: _gguf(t, drop=_block_names(2))),
        1,
        ("'model.layers.2.", "no tensor 'blk.2."),
    ),
    Case(
        "gguf_block_count_too_small",
        _convert(lambda t: _gguf(t, block_count=2)),
        1,
        ("no place for tensor 'blk.2.", "block_count is 2"),
    ),
    Case(
        "gguf_metadata_shape_mismatch",
        _convert(lambda t: _gguf(t, ffn_length=96)),
        1,
        ("model.layers.0.mlp.gate_proj.weight", "shape [96, 64]", "[128, 64]"),
    ),
    Case(
        "gguf_type_not_dequantizable",
        _convert(
            lambda t: _gguf(t, extra={"rope_freqs.weight": (np.zeros((1, 40), dtype=np.uint8), "Q8_1")})
        ),
        1,
        ("'rope_freqs.weight'", "Q8_1", "cannot dequantize"),
    ),
    Case("gguf_with_arch", _convert(lambda t: _gguf(t), "--arch", ARCH), 2, ("--arch does not apply",)),
]


def _gguf(tmp: Path, name: str = "m.gguf", **kw) -> Path:
    pytest.importorskip("gguf")
    from tests import gguf_models

    return gguf_models.write(_input(tmp, name), gguf_models.llama(), "Q8_0", **kw)


def _gguf_bytes(tmp: Path) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "in").mkdir()
        return _gguf(Path(d)).read_bytes()


def _gguf_cut(tmp: Path, keep: float) -> Path:
    data = _gguf_bytes(tmp)
    return _mk(tmp, "cut.gguf", data[: int(len(data) * keep)])


def _gguf_tensor_count(tmp: Path, delta: int) -> Path:
    data = bytearray(_gguf_bytes(tmp))
    count = struct.unpack_from("<Q", data, 8)[0]  # magic, version (u32), then the tensor count (u64)
    struct.pack_into("<Q", data, 8, count + delta)
    return _mk(tmp, "count.gguf", bytes(data))


def _block_names(i: int) -> tuple[str, ...]:
    return tuple(
        f"blk.{i}.{n}.weight"
        for n in (
            "attn_norm",
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_norm",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        )
    )


def _hf_missing_weight(tmp: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    d = _input(tmp, "gpt2")
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, n_positions=8)).save_pretrained(
        d
    )
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["transformer.h.0.attn.c_attn.weight"]
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def _hf_bin_only(tmp: Path) -> Path:
    d = _input(tmp, "hfdir")
    d.mkdir()
    (d / "config.json").write_text(
        json.dumps(
            {
                "model_type": "gpt2",
                "n_layer": 2,
                "n_embd": 16,
                "n_head": 2,
                "vocab_size": 32,
                "n_positions": 8,
            }
        )
    )
    (d / "pytorch_model.bin").write_bytes(_torch_bytes({"x": torch.zeros(2)}))
    return d


# ---------------------------------------------------------------------------------------------
# issue 19: the table grows by group. Inputs that take a while to build (a tiny BERT with its
# tokenizer, converted checkpoints) are built once into a template directory outside the case's
# tree and copied in; a case's tree (inputs, outputs, hidden entries) must not change.

BERT_VOCAB = (
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    + [f"w{i}" for i in range(40)]
    + "the a river stone is was where what how why you i".split()
)
TEXT = "\n".join(f"the river w{i} is a stone w{i + 1}" for i in range(30)) + "\n"


@functools.cache
def _template(name: str) -> Path:
    """Built once per session: ``mlp.safetensors``, ``mlp.lors``, ``mlp2.lors`` (rank 2), ``bert`` (an HF
    directory with its tokenizer), ``bert.lors``, ``bert_sharded.lors``."""
    root = _template_root()
    target = root / name
    if name == "mlp.safetensors":
        write_weights(target)
    elif name in ("mlp.lors", "mlp2.lors"):
        rank = "4" if name == "mlp.lors" else "2"
        res = run("convert", _template("mlp.safetensors"), "--arch", ARCH, "--rank", rank, "-o", target, "-q")
        assert res.exit_code == 0, res.output
    elif name == "bert":
        from transformers import BertConfig, BertModel, BertTokenizerFast

        (root / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n")
        BertTokenizerFast(vocab_file=str(root / "vocab.txt")).save_pretrained(str(target))
        torch.manual_seed(0)
        BertModel(
            BertConfig(
                vocab_size=len(BERT_VOCAB),
                hidden_size=16,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=32,
                max_position_embeddings=64,
            )
        ).save_pretrained(str(target))
    elif name in ("bert.lors", "bert_sharded.lors"):
        extra = ["--max-shard-size", "20KB"] if "sharded" in name else []
        res = run("convert", _template("bert"), "--rank", "2", "-o", target, "-q", *extra)
        assert res.exit_code == 0, res.output
    return target


@functools.lru_cache(maxsize=1)
def _template_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="lors-bad-inputs-"))
    atexit.register(shutil.rmtree, root, True)
    return root


def _copy_in(tmp: Path, name: str, as_name: str | None = None) -> Path:
    source = _template(name)
    target = _input(tmp, as_name or name)
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copy2(source, target)
    return target


def _st_bytes(tensors: dict) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        save_file(tensors, str(Path(d) / "x.safetensors"))
        return (Path(d) / "x.safetensors").read_bytes()


# ---- group "usage": flags and paths that are wrong (exit 2, nothing read that need not be)


def _conv(*flags):
    return lambda t: ["convert", _w(t), "--arch", ARCH, *flags]


def _calib_conv(*flags):
    return lambda t: ["convert", _w(t), "--arch", ARCH, "--calibrate", _good_tensors(t), *flags]


def _heal(*flags, data=True):
    def build(t):
        ckpt = _copy_in(t, "mlp.lors")
        return ["heal", ckpt, "--arch", ARCH, *(["--data", _good_tensors(t)] if data else []), *flags]

    return build


def _good_tensors(t: Path, name: str = "calib.safetensors", n: int = 40) -> Path:
    p = _input(t, name)
    if not p.exists():
        torch.manual_seed(1)
        save_file({"input": torch.randn(n, 8)}, str(p))
    return p


USAGE = [
    Case("rank_empty", _conv("--rank", ""), 2, ("--rank",), names=None),
    Case("rank_fraction", _conv("--rank", "1.5"), 2, ("--rank", "1.5"), names=None),
    Case("rank_full_suffix", _conv("--rank", "full8"), 2, ("--rank", "full8"), names=None),
    Case("rank_hex", _conv("--rank", "0x10"), 2, ("--rank", "0x10"), names=None),
    Case("groups_letters", _conv("--groups", "a,b"), 2, ("--groups", "a,b"), names=None),
    Case("groups_negative", _conv("--groups", "-1"), 2, ("--groups",), names=None),
    Case("groups_empty_items", _conv("--groups", ",,"), 2, ("--groups",), names=None),
    Case("device_unknown", _conv("--device", "tpu"), 2, ("--device", "tpu"), names=None),
    Case("svd_unknown", _conv("--svd", "magic"), 2, ("magic",), names=None),
    Case("init_unknown", _conv("--init", "random"), 2, ("random",), names=None),
    Case("preset_unknown", _conv("--preset", "other"), 2, ("--preset", "other"), names=None),
    Case("refine_negative", _conv("--refine", "-1"), 2, ("--refine",), names=None),
    Case("refine_not_int", _conv("--refine", "two"), 2, ("--refine",), names=None),
    Case("budget_zero", _conv("--budget", "0"), 2, ("budget",), names=None),
    Case("budget_negative", _conv("--budget", "-0.5"), 2, ("budget",), names=None),
    Case("budget_not_a_number", _conv("--budget", "half"), 2, ("--budget",), names=None),
    Case("budget_with_groups", _conv("--budget", "0.5", "--groups", "2"), 2, ("groups",), names=None),
    Case(
        "sharing_unknown", _conv("--budget", "0.5", "--sharing", "sometimes"), 2, ("--sharing",), names=None
    ),
    Case("sharing_without_budget", _conv("--sharing", "never"), 2, ("--sharing", "--budget"), names=None),
    Case(
        "objective_without_calibrate",
        _conv("--objective", "layer"),
        2,
        ("--objective", "--calibrate"),
        names=None,
    ),
    Case("objective_unknown", _calib_conv("--objective", "sideways"), 2, ("--objective",), names=None),
    Case("probes_zero", _calib_conv("--probes", "0"), 2, ("--probes",), names=None),
    Case("probes_without_calibrate", _conv("--probes", "2"), 2, ("--probes", "--calibrate"), names=None),
    Case(
        "probes_with_layer_objective",
        _calib_conv("--objective", "layer", "--probes", "2"),
        2,
        ("--probes",),
        names=None,
    ),
    Case(
        "heldout_text_without_a_tokenizer",
        lambda t: [*_conv()(t), "--heldout", _mk(t, "held.txt", TEXT.encode())],
        2,
        ("text held-out inputs need a Hugging Face text model",),
        names=None,
    ),
    Case(
        "heldout_fraction_without_calibrate",
        _conv("--heldout-fraction", "0.2"),
        2,
        ("--heldout-fraction",),
        names=None,
    ),
    Case("heldout_fraction_one", _calib_conv("--heldout-fraction", "1"), 2, ("[0, 1)",), names=None),
    Case("heldout_fraction_negative", _calib_conv("--heldout-fraction", "-0.2"), 2, ("[0, 1)",), names=None),
    Case(
        "heldout_fraction_zero_alone",
        _calib_conv("--heldout-fraction", "0"),
        2,
        ("holds nothing back",),
        names=None,
    ),
    Case(
        "heldout_fraction_with_heldout",
        lambda t: [
            *_calib_conv("--heldout-fraction", "0.3")(t),
            "--heldout",
            _good_tensors(t, "held.safetensors"),
        ],
        2,
        ("replaces the split",),
        names=None,
    ),
    Case(
        "adaptive_bad_spec",
        _conv("--adaptive", "blocks.*.up: 2 x [3y4]"),
        2,
        ("generator layout", "3y4"),
        names=None,
    ),
    Case("arch_without_colon", _conv("--arch", "tests.archs.stacked_mlp"), 2, ("--arch",), names=None),
    Case("arch_missing_attribute", _conv("--arch", "tests.archs:no_such_fn"), 2, ("no_such_fn",), names=None),
    Case("unknown_option", _conv("--bogus"), 2, ("--bogus",), names=None),
    Case("extra_argument", lambda t: [*_conv()(t), "extra"], 2, ("extra",), names=None),
    Case("convert_without_source", lambda t: ["convert"], 2, ("Missing argument",), names=None),
    Case(
        "report_ranks_letters",
        lambda t: ["report", _w(t), "--arch", ARCH, "--ranks", "4,x"],
        2,
        ("--ranks",),
        names=None,
    ),
    Case(
        "report_ranks_zero",
        lambda t: ["report", _w(t), "--arch", ARCH, "--ranks", "0"],
        2,
        ("--ranks",),
        names=None,
    ),
    Case(
        "report_plot_of_a_checkpoint",
        lambda t: ["report", _copy_in(t, "mlp.lors"), "--plot", t / "p.png"],
        2,
        ("--plot",),
        names=None,
    ),
    Case("merge_without_path", lambda t: ["merge"], 2, ("Missing argument",), names=None, out="merged"),
    Case("heal_steps_zero", _heal("--steps", "0"), 2, ("--steps",), names=None),
    Case("heal_lr_zero", _heal("--lr", "0"), 2, ("--lr",), names=None),
    Case("heal_lr_negative", _heal("--lr", "-1e-3"), 2, ("--lr",), names=None),
    Case("heal_match_unknown", _heal("--match", "blocks"), 2, ("--match", "blocks"), names=None),
    Case("heal_loss_unknown", _heal("--loss", "l1", "--steps", "2"), 2, ("loss", "l1"), names=None),
    Case(
        "heal_train_unknown", _heal("--train", "some", "--steps", "2"), 2, ("trainable", "some"), names=None
    ),
    Case("heal_synthetic_above_one", _heal("--synthetic", "2"), 2, ("--synthetic",), names=None),
    Case("heal_synthetic_negative", _heal("--synthetic", "-0.5"), 2, ("--synthetic",), names=None),
    Case("heal_without_data", _heal(data=False), 2, ("--data",), names=None),
    Case(
        "heal_without_arch",
        lambda t: ["heal", _copy_in(t, "mlp.lors"), "--data", _good_tensors(t)],
        2,
        ("--arch",),
    ),
    Case(
        "heal_heldout_fraction_zero_alone",
        _heal("--heldout-fraction", "0"),
        2,
        ("holds nothing back",),
        names=None,
    ),
]

# ---- group "paths": a path that is not there, or not a file, is a usage error (exit 2)

PATHS = [
    Case(
        "convert_missing_safetensors",
        lambda t: ["convert", _input(t, "nope.safetensors"), "--arch", ARCH],
        2,
        ("no such file",),
    ),
    Case("convert_missing_directory", lambda t: ["convert", _input(t, "nope_dir")], 2, ("no such file",)),
    Case(
        "report_missing_source",
        lambda t: ["report", _input(t, "nope.pt"), "--arch", ARCH],
        2,
        ("no such file",),
    ),
    Case(
        "heal_missing_checkpoint",
        lambda t: ["heal", _input(t, "nope.lors"), "--data", _good_tensors(t)],
        2,
        ("no such file",),
    ),
    Case(
        "heal_missing_data",
        lambda t: ["heal", _copy_in(t, "mlp.lors"), "--arch", ARCH, "--data", _input(t, "nope.txt")],
        2,
        ("does not exist",),
        names="{tmp}/in/nope.txt",
    ),
    Case(
        "heal_missing_heldout",
        lambda t: [*_heal()(t), "--heldout", _input(t, "nope.pt")],
        2,
        ("does not exist",),
        names="{tmp}/in/nope.pt",
    ),
    Case(
        "convert_missing_calibrate",
        _conv("--calibrate", "/nonexistent/calib.txt"),
        2,
        ("does not exist",),
        names="/nonexistent/calib.txt",
    ),
    Case(
        "convert_missing_heldout",
        lambda t: [*_calib_conv()(t), "--heldout", _input(t, "nope.safetensors")],
        2,
        ("does not exist",),
        names="{tmp}/in/nope.safetensors",
    ),
    Case(
        "arch_package_missing",
        _conv("--arch", "no_such_package_xyz:build"),
        2,
        ("no_such_package_xyz",),
        names=None,
    ),
]


# ---- group "calibration": files given to --calibrate, --heldout (convert) and --data, --heldout (heal)


def _text(data: bytes):
    return lambda t, name: _mk(t, name + ".txt", data)


def _tensor_file(tensors: dict | None = None, raw: bytes | None = None, suffix: str = ".safetensors"):
    def build(t, name):
        return _mk(t, name + suffix, raw if raw is not None else _st_bytes(tensors))

    return build


def _pt(obj):
    return lambda t, name: _mk(t, name + ".pt", _torch_bytes(obj))


def _evil_data(t, name):
    return _mk(t, name + ".pt", _torch_bytes(Evil(t / "marker")))


def _directory(t, name):
    p = _input(t, name + ".txt")
    p.mkdir()
    return p


def _fifo(t, name):
    p = _input(t, name + ".txt")
    os.mkfifo(p)
    return p


def _tokens(ids) -> dict:
    ids = torch.as_tensor(ids)
    return {"input_ids": ids, "attention_mask": torch.ones(ids.shape, dtype=torch.int64)}


VOCAB = len(BERT_VOCAB)
_T = torch.randn(20, 8)

# kind -> (model, builder, code, words, in a held-out slot too)
CALIBRATION_KINDS = {
    "text_empty": ("bert", _text(b""), 1, ("no text lines",), True),
    "text_blank_lines": ("bert", _text(b"\n  \n\t\n"), 1, ("no text lines",), True),
    "text_binary": ("bert", _text(b"PK\x03\x04\x00\x00binary" * 64), 1, ("binary", "NUL"), True),
    "text_utf16": ("bert", _text("the river\n".encode("utf-16")), 1, ("binary",), True),
    "text_latin1": ("bert", _text("the caf\xe9 river\n".encode("latin-1")), 1, ("not UTF-8", "0xe9"), True),
    "text_one_10mb_line": ("bert", _text(b"river " * 1_800_000), 1, ("line 1", "characters"), True),
    "text_one_line": ("bert", _text(b"the river is a stone\n"), 1, ("too few",), False),
    "text_directory": ("bert", _directory, 2, ("regular file", "directory"), True),
    "text_fifo": ("bert", _fifo, 2, ("regular file", "special file"), True),
    "tensor_empty_file": ("mlp", _tensor_file(raw=b""), 1, ("empty",), True),
    "tensor_truncated": (
        "mlp",
        _tensor_file(raw=_st_bytes({"input": _T})[:60]),
        1,
        ("not a readable safetensors",),
        True,
    ),
    "tensor_random_pt": (
        "mlp",
        _tensor_file(raw=os.urandom(512), suffix=".pt"),
        1,
        ("not a readable PyTorch file",),
        True,
    ),
    "tensor_pickle_payload": ("mlp", _evil_data, 1, ("refused to unpickle", "runs code"), True),
    "tensor_string_pt": ("mlp", _pt("not tensors"), 1, ("expected a tensor",), True),
    "tensor_empty_dict_pt": ("mlp", _pt({}), 1, ("expected a tensor",), True),
    "tensor_nan": ("mlp", _tensor_file({"input": torch.full((20, 8), float("nan"))}), 1, ("NaN",), True),
    "tensor_inf": ("mlp", _tensor_file({"input": torch.full((20, 8), float("inf"))}), 1, ("Inf",), True),
    "tensor_overflowing_values": (
        "mlp",
        _tensor_file({"input": torch.full((20, 8), 3e38)}),
        1,
        ("not finite",),
        True,
    ),
    "tensor_scalar": ("mlp", _tensor_file({"input": torch.tensor(1.0)}), 1, ("scalar",), True),
    "tensor_wrong_width": (
        "mlp",
        _tensor_file({"input": torch.randn(20, 5)}),
        1,
        ("cannot run", "shapes"),
        True,
    ),
    "tensor_integer_inputs": (
        "mlp",
        _tensor_file({"input": torch.ones(20, 8, dtype=torch.int64)}),
        1,
        ("cannot run",),
        True,
    ),
    "tensor_counts_disagree": (
        "mlp",
        _tensor_file({"a": torch.randn(10, 8), "b": torch.randn(12, 8)}),
        1,
        ("disagree",),
        True,
    ),
    "tensor_unknown_keywords": (
        "mlp",
        _tensor_file({"a": torch.randn(10, 8), "b": torch.randn(10, 8)}),
        1,
        ("cannot run", "argument"),
        True,
    ),
    "tensor_no_samples": ("mlp", _tensor_file({"input": torch.randn(0, 8)}), 1, ("too few",), False),
    "tensor_one_sample": ("mlp", _tensor_file({"input": torch.randn(1, 8)}), 1, ("too few",), False),
    "token_ids_beyond_vocabulary": (
        "bert",
        _tensor_file(_tokens(torch.full((8, 6), VOCAB + 3))),
        1,
        ("cannot run", "index"),
        True,
    ),
    "token_ids_negative": ("bert", _tensor_file(_tokens(torch.full((8, 6), -1))), 1, ("cannot run",), True),
    "token_ids_int64_overflow": (
        "bert",
        _tensor_file(_tokens(torch.full((8, 6), 2**62))),
        1,
        ("cannot run",),
        True,
    ),
    "token_ids_float": ("bert", _tensor_file(_tokens(torch.full((8, 6), 3.0))), 1, ("cannot run",), True),
}


def _good(t: Path, model: str, kind: str = "text") -> Path:
    """Good data of the same kind as ``kind``'s bad file (a held-out file is read like the calibration one)."""
    if model == "mlp":
        return _good_tensors(t, "good.safetensors")
    if kind.startswith("token"):
        torch.manual_seed(2)
        return _tensor_file(_tokens(torch.randint(5, VOCAB, (16, 6))))(t, "good")
    return _mk(t, "good.txt", TEXT.encode())


def _calibration_case(slot: str, kind: str) -> Case:
    model, builder, code, words, _ = CALIBRATION_KINDS[kind]
    arch = ["--arch", ARCH] if model == "mlp" else []

    def build(t):
        bad = builder(t, "bad")
        if slot.startswith("convert"):
            src = _w(t) if model == "mlp" else _copy_in(t, "bert")
            data = (
                ["--calibrate", bad]
                if slot == "convert_calibrate"
                else ["--calibrate", _good(t, model, kind), "--heldout", bad]
            )
            return ["convert", src, *arch, *data, "--rank", "2"]
        ckpt = _copy_in(t, "mlp.lors" if model == "mlp" else "bert.lors")
        data = ["--data", bad] if slot == "heal_data" else ["--data", _good(t, model, kind), "--heldout", bad]
        return ["heal", ckpt, *arch, *data, "--steps", "2"]

    suffix = (
        ".txt"
        if kind.startswith("text") or builder in (_directory, _fifo)
        else (
            ".pt"
            if kind
            in ("tensor_random_pt", "tensor_pickle_payload", "tensor_string_pt", "tensor_empty_dict_pt")
            else ".safetensors"
        )
    )
    return Case(
        f"{slot}-{kind}",
        build,
        code,
        words,
        names="{tmp}/in/bad" + suffix,
        marker=kind == "tensor_pickle_payload",
    )


CALIBRATION = [
    _calibration_case(slot, kind)
    for kind, spec in CALIBRATION_KINDS.items()
    for slot in ("convert_calibrate", "convert_heldout", "heal_data", "heal_heldout")
    if spec[4] or slot in ("convert_calibrate", "heal_data")
]


# ---- group "confined": names and links that lead out of a model directory or a checkpoint


def _outside(t: Path, name: str, data: bytes = b"{}") -> Path:
    p = t / "outside" / name
    p.parent.mkdir(exist_ok=True)
    p.write_bytes(data)
    return p


def _link_out(entry: str):
    """The entry becomes a symlink to a copy of itself outside the directory (the content is valid)."""

    def tamper(t: Path, d: Path):
        target = _outside(t, entry, (d / entry).read_bytes())
        (d / entry).unlink()
        (d / entry).symlink_to(target)

    return tamper


def _shard_index(names: list[str]):
    def tamper(t: Path, d: Path):
        weights = d / "model.safetensors"
        shard = d / "model-00001-of-00001.safetensors"
        weights.rename(shard)
        keys = list(load_file(str(shard)))
        mapping = {k: names[i % len(names)] for i, k in enumerate(keys)}
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": mapping}))
        _outside(t, "secret.safetensors", shard.read_bytes())

    return tamper


def _shard_link_out(t: Path, d: Path):
    _shard_index(["model-00001-of-00001.safetensors"])(t, d)
    _link_out("model-00001-of-00001.safetensors")(t, d)


def _index_link_out(t: Path, d: Path):
    _shard_index(["model-00001-of-00001.safetensors"])(t, d)
    _link_out("model.safetensors.index.json")(t, d)


SOURCE_TAMPERS = {
    "config_links_out": (_link_out("config.json"), ("config 'config.json' links to a file outside",)),
    "tokenizer_links_out": (_link_out("tokenizer.json"), ("side file 'tokenizer.json' links",)),
    "tokenizer_config_links_out": (
        _link_out("tokenizer_config.json"),
        ("side file 'tokenizer_config.json' links",),
    ),
    "weights_link_out": (_link_out("model.safetensors"), ("'model.safetensors' links to a file outside",)),
    "index_links_out": (_index_link_out, ("index", "links to a file outside")),
    "index_shard_dotdot": (_shard_index(["../outside/secret.safetensors"]), ("names a file outside",)),
    "index_shard_absolute": (
        lambda t, d: _shard_index([str(t / "outside" / "secret.safetensors")])(t, d),
        ("names a file outside",),
    ),
    "index_shard_subdirectory": (_shard_index(["sub/model.safetensors"]), ("names a file outside",)),
    "index_shard_links_out": (_shard_link_out, ("shard", "links to a file outside")),
}


def _source_case(command: str, kind: str) -> Case:
    tamper, words = SOURCE_TAMPERS[kind]

    def build(t):
        d = _copy_in(t, "bert")
        tamper(t, d)
        return ["convert", d, "--rank", "2"] if command == "convert" else ["report", d, "--ranks", "2"]

    return Case(f"{command}_source-{kind}", build, 1, words)


CKPT_TAMPERS = {  # kind -> (tamper, words, commands it must stop)
    "config_links_out": (
        _link_out("lors_config.json"),
        ("config 'lors_config.json' links",),
        ("report", "merge", "heal"),
    ),
    "weights_link_out": (
        _link_out("model.safetensors"),
        ("'model.safetensors' links",),
        ("report", "merge", "heal"),
    ),
    "side_file_links_out": (
        _link_out("tokenizer.json"),
        ("side file 'tokenizer.json' links",),
        ("merge", "heal"),
    ),
    "report_links_out": (_link_out("report.json"), ("report 'report.json' links",), ("report", "heal")),
}


def _ckpt_case(command: str, kind: str, sharded: bool = False) -> Case:
    if sharded:
        tamper, words = (lambda t, d: _rename_shard(d)), ("names a file outside",)
    else:
        tamper, words, _ = CKPT_TAMPERS[kind]

    def build(t):
        d = _copy_in(t, "bert_sharded.lors" if sharded else "bert.lors", "c.lors")
        tamper(t, d)
        if command == "heal":
            return ["heal", d, "--data", _good(t, "bert"), "--steps", "2"]
        return [command, d]

    return Case(
        f"{command}_checkpoint-{kind}", build, 1, words, out="merged" if command == "merge" else "out.lors"
    )


def _rename_shard(d: Path) -> None:
    index = json.loads((d / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"] = {k: (f"../{v}" if v == first else v) for k, v in index["weight_map"].items()}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


CONFINED = (
    [_source_case(c, k) for k in SOURCE_TAMPERS for c in ("convert", "report")]
    + [_ckpt_case(c, k) for k, (_, _, commands) in CKPT_TAMPERS.items() for c in commands]
    + [_ckpt_case(c, "index_shard_dotdot", sharded=True) for c in ("report", "merge", "heal")]
)


# ---- group "heal_state": a state beside the output that this command must not resume


def _heal_state(**given):
    """A state left by ``heal`` with other settings (interrupted after 2 steps) at the CLI's path."""

    def build(t):
        settings = dict(given)
        import lors_convert
        from lors_convert.calibrate.data import load_calibration
        from lors_convert.heal import heal
        from lors_convert.io.sources import load_source

        ckpt = _copy_in(t, settings.pop("ckpt", "mlp.lors"))
        data = _good_tensors(t)
        other = _good_tensors(t, "other.safetensors", n=30) if settings.pop("other_data", False) else data
        teacher, _ = load_source(_template("mlp.safetensors"), arch=ARCH)
        student = lors_convert.load(ckpt, arch=ARCH)
        batches = load_calibration(other).calibration
        kwargs = {"steps": 4, "lr": 1e-3, "loss": "mse", "trainable": "lors", "match": "output", **settings}

        def stop(step, steps, loss):
            if step == 2:
                raise KeyboardInterrupt

        try:
            heal(
                student,
                teacher,
                batches,
                checkpoint_path=t / ".out.lors.heal-state.pt",
                progress=stop,
                **kwargs,
            )
        except KeyboardInterrupt:
            pass
        assert (t / ".out.lors.heal-state.pt").is_file()
        return ["heal", _copy_in(t, "mlp.lors", "c.lors"), "--arch", ARCH, "--data", data, "--steps", "4"]

    return build


def _state_file(make):
    def build(t):
        make(t / ".out.lors.heal-state.pt")
        return ["heal", _copy_in(t, "mlp.lors"), "--arch", ARCH, "--data", _good_tensors(t), "--steps", "4"]

    return build


def _truncated_state(path: Path) -> None:
    _heal_state()(path.parent)
    shutil.rmtree(path.parent / "in")
    (path.parent / "in").mkdir()
    path.write_bytes(path.read_bytes()[:200])


def _state_without(key: str):
    def make(path: Path) -> None:
        _heal_state()(path.parent)
        shutil.rmtree(path.parent / "in")
        (path.parent / "in").mkdir()
        state = torch.load(path, weights_only=True)
        del state[key]
        torch.save(state, path)

    return make


def _state_link(path: Path) -> None:
    target = _outside(path.parent, "state.pt", _torch_bytes({"version": 2}))
    path.symlink_to(target)


HEAL_STATE = [
    Case("other_steps", _heal_state(steps=5), 2, ("different command", "steps 5 -> 4", "--force")),
    Case("other_lr", _heal_state(lr=3e-3), 2, ("different command", "lr", "--force")),
    Case("other_loss", _heal_state(loss="cosine"), 2, ("different command", "loss 'cosine' -> 'mse'")),
    Case("other_match", _heal_state(match="layers"), 2, ("different command", "match 'layers' -> 'output'")),
    Case(
        "other_trainable", _heal_state(trainable="all"), 2, ("different command", "trainable 'all' -> 'lors'")
    ),
    Case("other_data", _heal_state(other_data=True), 2, ("different command", "(data)")),
    Case("other_model_shapes", _heal_state(ckpt="mlp2.lors"), 2, ("cannot resume",)),
    Case(
        "corrupt_bytes",
        _state_file(lambda p: p.write_bytes(b"\x80\x04garbage")),
        2,
        ("cannot read the heal state",),
    ),
    Case("empty_file", _state_file(lambda p: p.write_bytes(b"")), 2, ("cannot read the heal state",)),
    Case("truncated", _state_file(_truncated_state), 2, ("cannot read the heal state",)),
    Case(
        "old_version",
        _state_file(lambda p: p.write_bytes(_torch_bytes({"version": 1, "step": 2}))),
        2,
        ("another version of lors",),
    ),
    Case(
        "not_a_dict",
        _state_file(lambda p: p.write_bytes(_torch_bytes([1, 2, 3]))),
        2,
        ("cannot read the heal state",),
    ),
    Case("without_optimizer", _state_file(_state_without("optimizer")), 2, ("cannot resume",)),
    Case("directory", _state_file(lambda p: p.mkdir()), 2, ("not a regular file",)),
    Case("symlink", _state_file(_state_link), 2, ("not a regular file",)),
]
for case in HEAL_STATE:
    case.names = "{tmp}/.out.lors.heal-state.pt"


# ---- group "outputs": an output that would replace one of the inputs, or exists

OUTPUTS = [
    Case(
        "convert_onto_calibration_file",
        lambda t: [*_calib_conv()(t), "--force"],
        2,
        ("would replace the input",),
        names="{tmp}/in/calib.safetensors",
        out="in/calib.safetensors",
    ),
    Case(
        "convert_onto_heldout_file",
        lambda t: [*_calib_conv()(t), "--heldout", _good_tensors(t, "held.safetensors"), "--force"],
        2,
        ("would replace the input",),
        names="{tmp}/in/held.safetensors",
        out="in/held.safetensors",
    ),
    Case(
        "heal_onto_its_checkpoint",
        lambda t: [*_heal()(t), "--force"],
        2,
        ("would replace the input",),
        names="{tmp}/in/mlp.lors",
        out="in/mlp.lors",
    ),
    Case(
        "heal_onto_its_data",
        lambda t: [*_heal()(t), "--force"],
        2,
        ("would replace the input",),
        names="{tmp}/in/calib.safetensors",
        out="in/calib.safetensors",
    ),
    Case(
        "heal_onto_the_input_directory",
        lambda t: [*_heal()(t), "--force"],
        2,
        ("would replace the input",),
        names="{tmp}/in/mlp.lors",
        out="in",
    ),
    Case(
        "heal_output_exists",
        lambda t: [_old_output(t / "out.lors"), *_heal()(t)][1:],
        2,
        ("already exists", "--force"),
        names="{tmp}/out.lors",
    ),
]

for group, cases in (
    ("source", CASES),
    ("usage", USAGE),
    ("paths", PATHS),
    ("calibration", CALIBRATION),
    ("confined", CONFINED),
    ("heal_state", HEAL_STATE),
    ("outputs", OUTPUTS),
):
    for case in cases:
        case.group = group
CASES = CASES + USAGE + PATHS + CALIBRATION + CONFINED + HEAL_STATE + OUTPUTS


@pytest.mark.parametrize("case", CASES, ids=[f"{c.group}-{c.id}" for c in CASES])
def test_bad_input(case: Case, tmp_path):
    (tmp_path / "in").mkdir()
    args = case.build(tmp_path)
    out = tmp_path / case.out
    if args and args[0] in ("convert", "merge", "heal"):
        args += ["-o", out]
    existed = os.path.lexists(out)
    before = tree_state(tmp_path)
    with warnings.catch_warnings(record=True) as caught:  # a warning is a second line on a user's stderr
        warnings.simplefilter("always")
        res = run(*args)
    shown = [
        f"{w.category.__name__}: {w.message}"
        for w in caught
        if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))
    ]
    assert not shown, shown
    names = case.names.format(input=args[1] if len(args) > 1 else "", tmp=tmp_path) if case.names else None
    line = assert_clean_failure(res, case.code, (), names)
    for w in case.words:  # not in the case's temporary path, which holds its name
        assert w in line.replace(str(tmp_path), "<tmp>"), (w, line)
    assert os.path.lexists(out) == existed
    assert tree_state(tmp_path) == before  # inputs untouched, nothing written, no hidden leftovers
    if case.marker:
        assert not (tmp_path / "marker").exists(), "the pickle payload ran"


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


# ---------------------------------------------------------------------------------------------
# outputs


def _old_output(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "keep.txt").write_text("precious")
    return path


@pytest.mark.parametrize("command", ["convert", "merge", "merge_file"])
def test_existing_output_is_refused_without_force(command, tmp_path, small_ckpt):
    src = write_weights(tmp_path / "w.safetensors")
    if command == "convert":
        out = _old_output(tmp_path / "out.lors")
        args = ["convert", src, "--arch", ARCH, "--rank", "4", "-o", out]
    else:
        ckpt = shutil.copytree(small_ckpt, tmp_path / "c.lors")
        out = tmp_path / ("m.safetensors" if command == "merge_file" else "merged")
        if command == "merge_file":
            out.write_bytes(b"precious")
        else:
            _old_output(out)
        args = ["merge", ckpt, "-o", out]
    before = tree_state(tmp_path)
    res = run(*args)
    assert_clean_failure(res, 2, ("already exists", "--force"), str(out))
    assert tree_state(tmp_path) == before


@pytest.mark.parametrize(
    "where",
    ["same_file", "parent_dir", "merge_onto_checkpoint", "merge_onto_parent", "merge_into_checkpoint_file"],
)
def test_output_that_would_replace_the_input_is_refused_even_with_force(where, tmp_path, small_ckpt):
    """'-o' naming the input (or a directory holding it) would delete the user's only copy."""
    (tmp_path / "work").mkdir()
    src = write_weights(tmp_path / "work" / "w.safetensors")
    ckpt = shutil.copytree(small_ckpt, tmp_path / "work" / "c.lors")
    args = {
        "same_file": ["convert", src, "--arch", ARCH, "-o", src],
        "parent_dir": ["convert", src, "--arch", ARCH, "-o", tmp_path / "work"],
        "merge_onto_checkpoint": ["merge", ckpt, "-o", ckpt],
        "merge_onto_parent": ["merge", ckpt, "-o", tmp_path / "work"],
        "merge_into_checkpoint_file": ["merge", ckpt, "-o", ckpt / "model.safetensors"],
    }[where]
    before = tree_state(tmp_path)
    res = run(*args, "--force")
    assert_clean_failure(res, 2, ("would replace the input",), str(args[1]))
    assert tree_state(tmp_path) == before


@pytest.mark.parametrize("command", ["convert", "merge"])
def test_output_under_a_regular_file(command, tmp_path, small_ckpt):
    """An unwritable output place (works as root too: a path below a regular file)."""
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    out = blocker / "out"
    if command == "convert":
        args = ["convert", write_weights(tmp_path / "w.safetensors"), "--arch", ARCH, "-o", out]
    else:
        args = ["merge", shutil.copytree(small_ckpt, tmp_path / "c.lors"), "-o", out]
    before = tree_state(tmp_path)
    res = run(*args)
    assert_clean_failure(res, 1, ("cannot write",), str(out))
    assert tree_state(tmp_path) == before


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="running as root: chmod 0o555 does not stop root from writing "
    "(test_output_under_a_regular_file covers unwritable outputs)",
)
def test_output_in_read_only_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    src = write_weights(tmp_path / "w.safetensors")
    ro.chmod(0o555)
    try:
        res = run("convert", src, "--arch", ARCH, "-o", ro / "out.lors")
        assert_clean_failure(res, 1, ("cannot write",), str(ro / "out.lors"))
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_kill_mid_write_keeps_previous_output(tmp_path):
    """SIGKILL while the new checkpoint is being written: the old output survives, no partial new one."""
    from tests.archs_big import BigEmbedMLP

    torch.manual_seed(0)
    src = tmp_path / "big.safetensors"
    big = BigEmbedMLP()
    torch.nn.init.normal_(big.table.weight)
    save_file(big.state_dict(), str(src))
    out = tmp_path / "out.lors"
    res = run(
        "convert",
        write_weights(tmp_path / "small.safetensors"),
        "--arch",
        ARCH,
        "--rank",
        "4",
        "-o",
        out,
        "-q",
    )
    assert res.exit_code == 0, res.output
    old = tree_state(out)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lors_convert",
            "convert",
            str(src),
            "--arch",
            "tests.archs_big:big_embed_mlp",
            "--rank",
            "4",
            "-o",
            str(out),
            "--force",
            "-q",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    killed_while_writing = False
    deadline = time.monotonic() + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                writing = any(any(t.iterdir()) for t in tmp_path.glob(".out.lors.tmp-*"))
            except FileNotFoundError:  # renamed onto out.lors between glob and iterdir: too late
                writing = False
            if writing:
                proc.send_signal(signal.SIGKILL)
                killed_while_writing = True
                break
            time.sleep(0.001)
    finally:
        if proc.poll() is None and not killed_while_writing:
            proc.kill()
        proc.wait()
    assert killed_while_writing, (
        f"the conversion ended before it could be killed mid-write: "
        f"rc={proc.returncode} {proc.stderr.read().decode()[-500:]}"
    )
    assert proc.returncode == -signal.SIGKILL
    assert tree_state(out) == old, "the previous output changed"
    visible = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert visible == ["big.safetensors", "out.lors", "small.safetensors"]
    # the killed run can leave only its hidden temp dir, never a partial out.lors
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers and all(p.name.startswith(".out.lors.tmp-") for p in leftovers)
    assert Checkpoint(out).report() is not None
    # the next write of out.lors sweeps the dead run's temp dir
    res = run(
        "convert", tmp_path / "small.safetensors", "--arch", ARCH, "--rank", "4", "-o", out, "--force", "-q"
    )
    assert res.exit_code == 0, res.output
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_sweep_removes_only_dead_local_temps(tmp_path):
    import socket

    from lors_convert.io.atomic import sweep_stale_temps

    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = int(done.stdout)  # exited: its pid is free (reuse within the test would only keep the entry)
    host = socket.gethostname()
    entries = {
        "dead": tmp_path / f".x.lors.tmp-{dead}@{host}.abc123",
        "live": tmp_path / f".x.lors.tmp-{os.getpid()}@{host}.def456",
        "other_host": tmp_path / f".x.lors.tmp-{dead}@not-{host}.ghi789",
        "old_style": tmp_path / ".x.lors.tmp-k2j3h4",
        "previous_output": tmp_path / ".x.lors.old-abc",
        "other_output": tmp_path / f".y.lors.tmp-{dead}@{host}.abc",
    }
    for p in entries.values():
        p.mkdir()
        (p / "model.safetensors").write_bytes(b"partial")
    (tmp_path / f".x.lors.tmp-{dead}@{host}.file").write_bytes(b"partial")  # a single-file output's temp
    removed = sweep_stale_temps(tmp_path, "x.lors")
    assert sorted(p.name for p in removed) == sorted(
        [entries["dead"].name, f".x.lors.tmp-{dead}@{host}.file"]
    )
    assert not entries["dead"].exists()
    assert all(p.exists() for k, p in entries.items() if k != "dead")


# ---------------------------------------------------------------------------------------------
# ranks, dtypes, ties


def test_rank_above_min_dim_is_clamped_with_a_warning(tmp_path):
    src = write_weights(tmp_path / "w.safetensors")
    out = tmp_path / "out.lors"
    res = run("convert", src, "--arch", ARCH, "--rank", "40", "--keep-unsaving", "-o", out, "--json")
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert any("min(d, h) = 32" in w and "clamped" in w for w in report["warnings"])
    for m in report["stacks"][0]["matrices"]:
        assert m["clamped"] is True and m["ranks"] == [32] * 4
    shown = json.loads(run("report", out, "--json").stdout)
    assert shown["warnings"] == report["warnings"]
    human = run("report", out)
    assert human.exit_code == 0 and "clamped" in human.stderr
    config = json.loads((out / "lors_config.json").read_text())
    assert all(p["clamped"] for s in config["stacks"] for p in s["params"])


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


def ok(*args):
    res = run(*args)
    assert res.exit_code == 0, (res.exit_code, res.stderr)
    return res


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

    config = _config(tmp_path / "hf.lors")  # a checkpoint from before stored_aliases
    del config["manifest"]["stored_aliases"]
    _set_config(tmp_path / "hf.lors", config, metadata_too=True)
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
        "tests.test_bad_inputs:tiny_tied_llama",
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


def tiny_tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=50,
            tie_word_embeddings=True,
        )
    )


# ---------------------------------------------------------------------------------------------
# tampered checkpoints: report, merge and load


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ckpt")
    src = write_weights(d / "w.safetensors")
    out = d / "mlp.lors"
    res = run("convert", src, "--arch", ARCH, "--rank", "4", "-o", out, "-q")
    assert res.exit_code == 0, res.output
    return out


def _config(ckpt: Path) -> dict:
    return json.loads((ckpt / "lors_config.json").read_text())


def _rewrite_weights(ckpt: Path, tensors=None, metadata=None) -> None:
    f = ckpt / "model.safetensors"
    with safe_open(str(f), "pt") as h:
        meta = dict(h.metadata() or {})
    tensors = load_file(str(f)) if tensors is None else tensors
    save_file(tensors, str(f), metadata=meta if metadata is None else metadata)


def _set_config(ckpt: Path, config: dict, metadata_too: bool) -> None:
    (ckpt / "lors_config.json").write_text(json.dumps(config, indent=1))
    if metadata_too:
        _rewrite_weights(ckpt, metadata={"format": "pt", "lors_config": json.dumps(config)})


def _edit(fn, metadata_too=True):
    def tamper(ckpt: Path):
        config = _config(ckpt)
        fn(config)
        _set_config(ckpt, config, metadata_too)

    return tamper


def _drop_tensor(key):
    def tamper(ckpt: Path):
        tensors = load_file(str(ckpt / "model.safetensors"))
        del tensors[key]
        _rewrite_weights(ckpt, tensors)

    return tamper


def _reshape_tensor(key):
    def tamper(ckpt: Path):
        tensors = load_file(str(ckpt / "model.safetensors"))
        tensors[key] = torch.zeros(tensors[key].shape[0] + 1, *tensors[key].shape[1:])
        _rewrite_weights(ckpt, tensors)

    return tamper


def _retype_tensor(key):
    def tamper(ckpt: Path):
        tensors = load_file(str(ckpt / "model.safetensors"))
        tensors[key] = tensors[key].half()
        _rewrite_weights(ckpt, tensors)

    return tamper


def _write(name, data: bytes):
    return lambda ckpt: (ckpt / name).write_bytes(data)


def _truncate(name, keep: int):
    return lambda ckpt: (ckpt / name).write_bytes((ckpt / name).read_bytes()[:keep])


def _ranks(c):
    c["stacks"][0]["params"][0]["ranks"] = [5, 5, 5, 5]


TAMPERS = {
    "config_deleted": (lambda ckpt: (ckpt / "lors_config.json").unlink(), ("config.json",)),
    "config_invalid_json": (_truncate("lors_config.json", 100), ("lors_config.json", "not valid JSON")),
    "config_not_utf8": (_write("lors_config.json", b"\xff\xfe{}"), ("lors_config.json",)),
    "config_unknown_version": (_edit(lambda c: c.update(format_version=99)), ("unknown format version 99",)),
    "config_no_stacks": (_edit(lambda c: c.pop("stacks")), ("missing field 'stacks'",)),
    "config_not_lors": (_edit(lambda c: c.update(format="other")), ("not a LORS config",)),
    "config_differs_from_metadata": (_edit(_ranks, metadata_too=False), ("differs from the config",)),
    "config_ranks_wrong_shape": (_edit(_ranks), ("blocks.0.up.lors_B", "shape")),
    "config_matrix_not_pair": (_edit(lambda c: c["stacks"][0]["params"][0].update(matrix=[64])), ("matrix",)),
    "config_members_not_strings": (
        _edit(lambda c: c["stacks"][0].update(members=[1, 2, 3, 4])),
        ("members",),
    ),
    "config_unknown_layer": (
        _edit(lambda c: c["stacks"][0]["params"][0].update(layer="rnn")),
        ("unknown layer kind 'rnn'",),
    ),
    "config_unknown_dtype": (
        _edit(lambda c: c["stacks"][0]["params"][0].update(dtype="float99")),
        ("unknown dtype",),
    ),
    "config_shared_unknown_name": (
        _edit(lambda c: c["stacks"][0]["params"][0].update(shared=["mean"])),
        ("shared must be ['shared'] or [] (private-only)",),
    ),
    "config_shared_dropped": (
        _edit(lambda c: c["stacks"][0]["params"][0].update(shared=[])),
        ("blocks.0.up.shared",),
    ),
    "manifest_dtype_differs": (
        _edit(lambda c: c["manifest"]["keys"]["head.weight"].update(dtype="float16")),
        ("head.weight", "float16"),
    ),
    "manifest_unknown_key": (
        _edit(lambda c: c["manifest"]["keys"].update({"ghost.weight": {"shape": [2], "dtype": "float32"}})),
        ("ghost.weight",),
    ),
    "metadata_invalid_json": (
        lambda ckpt: _rewrite_weights(ckpt, metadata={"lors_config": "{nope"}),
        ("differs from the config",),
    ),
    "missing_factor": (_drop_tensor("blocks.2.down.lors_B"), ("blocks.2.down.lors_B", "missing")),
    "missing_shared": (_drop_tensor("blocks.0.up.shared"), ("blocks.0.up.shared", "missing")),
    "missing_untouched": (_drop_tensor("head.weight"), ("head.weight", "missing")),
    "factor_wrong_shape": (_reshape_tensor("blocks.1.up.lors_A"), ("blocks.1.up.lors_A", "shape")),
    "untouched_wrong_shape": (_reshape_tensor("embed.weight"), ("embed.weight", "[33, 8]")),
    "untouched_wrong_dtype": (_retype_tensor("head.bias"), ("head.bias", "float16")),
    "weights_missing": (lambda ckpt: (ckpt / "model.safetensors").unlink(), ("missing weight file",)),
    "weights_truncated": (_truncate("model.safetensors", 500), ("not a readable safetensors",)),
    "weights_header_oversized": (
        lambda ckpt: _write(
            "model.safetensors", struct.pack("<Q", 2**62) + (ckpt / "model.safetensors").read_bytes()[8:]
        )(ckpt),
        ("not a readable safetensors",),
    ),
}


def _load_error(ckpt: Path):
    """The message of the LorsError lors_convert.load raises, or None if it loaded."""
    try:
        lors_convert.load(ckpt)
    except LorsError as e:
        return str(e)
    return None


@pytest.fixture(scope="module")
def sharded_ckpt(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sharded")
    out = d / "mlp.lors"
    res = run(
        "convert",
        write_weights(d / "w.safetensors"),
        "--arch",
        ARCH,
        "--rank",
        "4",
        "-o",
        out,
        "-q",
        "--max-shard-size",
        "20KB",
    )
    assert res.exit_code == 0, res.output
    assert len(list(out.glob("model-*.safetensors"))) > 1
    return out


def _index(fn):
    def tamper(ckpt: Path):
        index = json.loads((ckpt / "model.safetensors.index.json").read_text())
        fn(index["weight_map"])
        (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))

    return tamper


def _first_shard(ckpt: Path) -> Path:
    return sorted(ckpt.glob("model-*.safetensors"))[0]


SHARDED_TAMPERS = {
    "index_invalid_json": (_truncate("model.safetensors.index.json", 50), ("not valid JSON",)),
    "index_no_weight_map": (_write("model.safetensors.index.json", b'{"metadata": {}}'), ("weight_map",)),
    "index_file_not_a_string": (_index(lambda m: m.update({"head.weight": 7})), ("index",)),
    "index_points_outside": (
        _index(lambda m: m.update({"head.weight": "../../../etc/hostname"})),
        ("outside",),
    ),
    "index_names_missing_shard": (
        _index(lambda m: m.update({"head.weight": "model-00009-of-00009.safetensors"})),
        ("missing weight file",),
    ),
    "shard_deleted": (lambda ckpt: _first_shard(ckpt).unlink(), ("missing weight file",)),
    "shard_truncated": (
        lambda ckpt: _first_shard(ckpt).write_bytes(_first_shard(ckpt).read_bytes()[:100]),
        ("not a readable safetensors",),
    ),
}


@pytest.mark.parametrize("consumer", ["report", "merge", "load"])
@pytest.mark.parametrize("name", list(SHARDED_TAMPERS))
def test_tampered_sharded_checkpoint(name, consumer, sharded_ckpt, tmp_path):
    tamper, words = SHARDED_TAMPERS[name]
    _check_tamper(sharded_ckpt, tamper, words, consumer, tmp_path)


@pytest.mark.parametrize("consumer", ["report", "merge", "load"])
@pytest.mark.parametrize("name", list(TAMPERS))
def test_tampered_checkpoint(name, consumer, small_ckpt, tmp_path):
    tamper, words = TAMPERS[name]
    _check_tamper(small_ckpt, tamper, words, consumer, tmp_path)


def _check_tamper(source: Path, tamper, words, consumer: str, tmp_path: Path) -> None:
    ckpt = shutil.copytree(source, tmp_path / "c.lors")
    tamper(ckpt)
    before = tree_state(tmp_path)
    if consumer == "load":
        message = _load_error(ckpt)
        assert message is not None, "load accepted a tampered checkpoint"
        assert "\n" not in message and str(ckpt) in message, message
        for w in words:
            assert w in message, (w, message)
    else:
        out = tmp_path / "merged"
        res = run("report", ckpt) if consumer == "report" else run("merge", ckpt, "-o", out)
        assert_clean_failure(res, 1, words, str(ckpt))
        assert not out.exists()
    assert tree_state(tmp_path) == before


def test_tampered_report_json(small_ckpt, tmp_path):
    """report.json is only the numbers: report refuses a broken or inconsistent one, merge does not need it."""
    ckpt = shutil.copytree(small_ckpt, tmp_path / "c.lors")
    (ckpt / "report.json").write_text('{"stacks": [')
    assert_clean_failure(run("report", ckpt), 1, ("report.json",), str(ckpt))
    report = json.loads((small_ckpt / "report.json").read_text())
    report["stacks"][0]["matrices"][0]["ranks"] = [1, 1, 1, 1]
    (ckpt / "report.json").write_text(json.dumps(report))
    assert_clean_failure(run("report", ckpt), 1, ("report.json", "lors_config.json"), str(ckpt))
    report["stacks"][0]["matrices"][0]["ranks"] = [4, 4, 4, 4]
    report["stacks"][0]["matrices"][0]["lors_params"] = None
    (ckpt / "report.json").write_text(json.dumps(report))
    assert_clean_failure(run("report", ckpt), 1, ("report.json", "malformed"), str(ckpt))
    (ckpt / "report.json").unlink()
    assert_clean_failure(run("report", ckpt), 1, ("report.json",), str(ckpt))
    assert run("merge", ckpt, "-o", tmp_path / "m", "-q").exit_code == 0


def test_report_text_is_not_rich_markup(small_ckpt, tmp_path):
    """Names and warnings come from files: shown literally, never parsed as rich markup."""
    ckpt = shutil.copytree(small_ckpt, tmp_path / "c.lors")
    report = json.loads((ckpt / "report.json").read_text())
    report["warnings"] = ["odd [/] text [bold]"]
    report["stacks"][0]["kept_dense"] = {"x[/]": "why [red]"}
    (ckpt / "report.json").write_text(json.dumps(report))
    res = run("report", ckpt)
    assert res.exit_code == 0, res.output
    assert "odd [/] text [bold]" in res.stderr


@pytest.mark.parametrize(
    "model_fn, words",
    [
        (no_stacks, "does not match"),
        (lambda: StackedMLP(hidden=48), "does not match"),
        (lambda: StackedMLP(depth=3), "does not match"),
        (lambda: StackedMLP(depth=5), "do not match"),
    ],
)
def test_load_against_a_mismatching_architecture(model_fn, words, small_ckpt):
    with pytest.raises(LorsError) as info:
        lors_convert.load(small_ckpt, model=model_fn())
    message = str(info.value)
    assert words in message and str(small_ckpt) in message and "\n" not in message, message


# ---------------------------------------------------------------------------------------------
# fuzz: mutated headers and configs give clean errors only

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _containers(inner):
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 200) | st.floats(allow_nan=False) | st.text(max_size=8),
    _containers,
    max_leaves=8,
)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


def _replace(node, path, value, delete=False):
    if not path:
        return value
    parent = node
    for p in path[:-1]:
        parent = parent[p]
    if delete and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return node


MUTATIONS = st.one_of(
    st.tuples(st.just("config"), st.integers(0, 10**6), JSON, st.booleans(), st.booleans()),
    st.tuples(
        st.just("header_bytes"),
        st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4),
    ),
    st.tuples(st.just("header_length"), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("config_bytes"), st.integers(0, 10**6), st.binary(max_size=4)),
    st.tuples(st.just("report"), st.integers(0, 10**6), JSON, st.booleans()),
    st.tuples(st.just("index"), st.integers(0, 10**6), JSON, st.booleans()),
)


def _mutate_json(path: Path, index: int, value, delete: bool) -> None:
    data = json.loads(path.read_text())
    paths = list(_paths(data))
    path.write_text(json.dumps(_replace(data, paths[index % len(paths)], value, delete)))


def _mutate(ckpt: Path, mutation) -> None:
    kind = mutation[0]
    if kind == "report":
        _mutate_json(ckpt / "report.json", *mutation[1:])
    elif kind == "index":
        _mutate_json(ckpt / "model.safetensors.index.json", *mutation[1:])
    elif kind == "config":
        _, index, value, delete, metadata_too = mutation
        config = _config(ckpt)
        paths = list(_paths(config))
        config = _replace(config, paths[index % len(paths)], value, delete)
        (ckpt / "lors_config.json").write_text(json.dumps(config))
        if metadata_too:
            _rewrite_weights(ckpt, metadata={"format": "pt", "lors_config": json.dumps(config)})
    elif kind == "header_bytes":
        data = bytearray((ckpt / "model.safetensors").read_bytes())
        n = 8 + struct.unpack("<Q", bytes(data[:8]))[0]
        for pos, byte in mutation[1]:
            data[pos % n] = byte
        (ckpt / "model.safetensors").write_bytes(bytes(data))
    elif kind == "header_length":
        data = (ckpt / "model.safetensors").read_bytes()
        (ckpt / "model.safetensors").write_bytes(struct.pack("<Q", mutation[1]) + data[8:])
    else:
        data = (ckpt / "lors_config.json").read_bytes()
        pos = mutation[1] % (len(data) + 1)
        (ckpt / "lors_config.json").write_bytes(data[:pos] + mutation[2] + data[pos + len(mutation[2]) :])


@settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(mutation=MUTATIONS)
def test_fuzz_checkpoint_reader(mutation, small_ckpt, sharded_ckpt):
    with tempfile.TemporaryDirectory() as d:
        ckpt = shutil.copytree(sharded_ckpt if mutation[0] == "index" else small_ckpt, Path(d) / "c.lors")
        _mutate(ckpt, mutation)
        for fn in (
            lambda: Checkpoint(ckpt).report(),
            lambda: merge_checkpoint(ckpt, Path(d) / "m.safetensors", force=True),
            lambda: lors_convert.load(ckpt),
        ):
            try:
                fn()
            except LorsError as e:
                assert "\n" not in str(e) and str(e).strip(), repr(str(e))
        for args in (["report", ckpt, "--json"], ["merge", ckpt, "-o", Path(d) / "m2", "--force", "-q"]):
            res = run(*args)
            assert res.exit_code in (0, 1, 2), (res.exit_code, res.stderr)
            assert "Traceback" not in res.stderr and "set LORS_DEBUG=1" not in res.stderr, res.stderr
            if res.exit_code:
                one_line(res.stderr)
        assert not [p for p in Path(d).iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_heal_force_discards_a_state_left_by_other_settings(tmp_path):
    """The refused state's message says --force starts afresh: it does, and leaves no state behind."""
    (tmp_path / "in").mkdir()
    args = _heal_state(steps=5)(tmp_path)
    state = tmp_path / ".out.lors.heal-state.pt"
    assert state.is_file()
    res = run(*args, "-o", tmp_path / "out.lors", "--force", "--json")
    assert res.exit_code == 0, res.output
    quality = json.loads(res.stdout)["quality"]
    assert quality["heal_steps"] == 4 and quality["heal_samples"] == 32
    assert not state.exists() and Checkpoint(tmp_path / "out.lors").report() is not None
