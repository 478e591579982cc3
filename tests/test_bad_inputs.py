"""Bad inputs (issue 7): every one gets a clear error, nothing is lost, nothing runs that should not.

Each table case runs one ``lors`` command and checks: exit code 1 (runtime) or 2 (usage), exactly one
line on stderr that names the problem (and the file, where a file is the problem), no traceback,
nothing new on disk (no output, no hidden ``.NAME.tmp-*`` leftover) and every input byte-identical.
Then: the pickle payload proof, rank clamping, fp16/bf16, tied weights, SIGKILL mid-write, tampered
checkpoints against report/merge/load, a mismatching architecture, and a bounded fuzz of the reader.
"""
from __future__ import annotations

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

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
    return data[:8] + b"{" + b"\x00" * (n - 1) + data[8 + n:]  # not JSON


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
    Case("missing_file_merge", lambda t: ["merge", _input(t, "missing.lors")], 2, ("no such file",),
         out="merged"),
    Case("empty_pt", _convert(lambda t: _mk(t, "empty.pt", b"")), 1, ("empty",)),
    Case("empty_safetensors_arch", _convert(lambda t: _mk(t, "e.safetensors", b""), "--arch", ARCH), 1,
         ("empty",)),
    Case("truncated_safetensors", _convert(lambda t: _mk(t, "t.safetensors", _weights_bytes()[:3000]),
                                           "--arch", ARCH), 1, ("not a readable safetensors",)),
    Case("truncated_safetensors_no_arch", _convert(lambda t: _mk(t, "t.safetensors", _weights_bytes()[:3000])),
         1, ("not a readable safetensors",)),
    Case("header_oversized", _convert(lambda t: _mk(t, "h.safetensors", _bad_header("oversized")),
                                      "--arch", ARCH), 1, ("not a readable safetensors", "header")),
    Case("header_beyond_eof", _convert(lambda t: _mk(t, "h.safetensors", _bad_header("beyond_eof")),
                                       "--arch", ARCH), 1, ("not a readable safetensors",)),
    Case("header_corrupted", _convert(lambda t: _mk(t, "h.safetensors", _bad_header("json")),
                                      "--arch", ARCH), 1, ("not a readable safetensors",)),
    Case("random_bytes_pt", _convert(lambda t: _mk(t, "r.pt", os.urandom(4096))), 1,
         ("not a readable PyTorch file",)),
    Case("random_bytes_pt_arch", _convert(lambda t: _mk(t, "r.pt", os.urandom(4096)), "--arch", ARCH), 1,
         ("not a readable PyTorch file",)),
    Case("malicious_pickle", _convert(_evil), 1, ("refused to unpickle", "runs code", "--trust-pickle"),
         marker=True),
    Case("malicious_raw_pickle", _convert(lambda t: _evil(t, "raw.pkl", raw=True)), 1,
         ("refused to unpickle", "runs code", "--trust-pickle"), marker=True),
    Case("malicious_pickle_arch", _convert(_evil, "--arch", ARCH), 1, ("refused to unpickle", "runs code"),
         marker=True),
    Case("malicious_pickle_report", lambda t: ["report", _evil(t)], 1,
         ("refused to unpickle", "--trust-pickle"), marker=True),
    Case("pickle_dict_of_strings", _convert(lambda t: _mk(t, "d.pt", _torch_bytes({"a": "b", "c": "d"}))), 1,
         ("expected a model or a state dict", "dict of str")),
    Case("pickle_dict_of_strings_arch", _convert(lambda t: _mk(t, "d.pt", _torch_bytes({"a": "b"})),
                                                 "--arch", ARCH), 1, ("expected a state dict",)),
    Case("pickle_list", _convert(lambda t: _mk(t, "l.pt", _torch_bytes([1, "two", 3.0]))), 1,
         ("expected a model or a state dict", "list")),
    Case("no_stacks", _convert(lambda t: write_weights(_input(t, "n.safetensors"), no_stacks().state_dict()),
                               "--arch", "tests.archs:no_stacks"), 1, ("no stacks found", "searched 4 modules")),
    Case("include_matches_nothing", _convert(_w, "--arch", ARCH, "--include", "*nothing*"), 2,
         ("*nothing*", "matches no")),
    Case("exclude_everything", _convert(_w, "--arch", ARCH, "--exclude", "*"), 2, ("no stacked parameter",)),
    Case("rank_zero", _convert(_w, "--arch", ARCH, "--rank", "0"), 2, ("--rank", "positive"), names=None),
    Case("rank_negative", _convert(_w, "--arch", ARCH, "--rank", "-3"), 2, ("--rank", "-3"), names=None),
    Case("rank_not_a_number", _convert(_w, "--arch", ARCH, "--rank", "eight"), 2, ("--rank", "eight"), names=None),
    Case("groups_wrong_length", _convert(_w, "--arch", ARCH, "--groups", "1,2"), 2,
         ("groups has 2 entries", "4 layers")),
    Case("groups_zero", _convert(_w, "--arch", ARCH, "--groups", "1,0,1,1"), 2, ("--groups",), names=None),
    Case("nan_in_stacked_weight", _convert(lambda t: write_weights(
        _input(t, "nan.safetensors"), _nonfinite("blocks.2.up.weight", float("nan"))), "--arch", ARCH), 1,
         ("blocks.2.up.weight", "NaN")),
    Case("inf_in_stacked_weight", _convert(lambda t: write_weights(
        _input(t, "inf.safetensors"), _nonfinite("blocks.0.down.weight", float("-inf"))), "--arch", ARCH), 1,
         ("blocks.0.down.weight", "Inf")),
    Case("inf_in_untouched_weight", _convert(lambda t: write_weights(
        _input(t, "inf.safetensors"), _nonfinite("head.weight", float("inf"))), "--arch", ARCH), 1,
         ("head.weight", "Inf")),
    Case("state_dict_wrong_keys_for_arch", _convert(_w, "--arch", "tests.archs:no_stacks"), 1,
         ("does not match --arch",)),
    Case("state_dict_wrong_shapes_for_arch", _convert(lambda t: write_weights(
        _input(t, "h48.safetensors"), mlp_state(hidden=48)), "--arch", ARCH), 1,
         ("blocks.0.up.weight", "shape [48, 32]")),
    Case("hf_dir_missing_weight", _convert(lambda t: _hf_missing_weight(t)), 1,
         ("transformer.h.0.attn.c_attn.weight", "missing", "randomly")),
    Case("arch_not_a_module", _convert(_w, "--arch", "builtins:dict"), 1, ("not a torch nn.Module",),
         names="builtins:dict"),
    Case("hf_dir_without_safetensors", _convert(lambda t: _hf_bin_only(t)), 1, ("model.safetensors",)),
]


def _hf_missing_weight(tmp: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    d = _input(tmp, "gpt2")
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, n_positions=8)).save_pretrained(d)
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["transformer.h.0.attn.c_attn.weight"]
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def _hf_bin_only(tmp: Path) -> Path:
    d = _input(tmp, "hfdir")
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 16,
                                                "n_head": 2, "vocab_size": 32, "n_positions": 8}))
    (d / "pytorch_model.bin").write_bytes(_torch_bytes({"x": torch.zeros(2)}))
    return d


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path):
    (tmp_path / "in").mkdir()
    args = case.build(tmp_path)
    out = tmp_path / case.out
    if args[0] in ("convert", "merge"):
        args += ["-o", out]
    before = tree_state(tmp_path)
    res = run(*args)
    names = case.names.format(input=args[1]) if case.names else None
    assert_clean_failure(res, case.code, case.words, names)
    assert not out.exists()
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


@pytest.mark.parametrize("where", ["same_file", "parent_dir", "merge_onto_checkpoint", "merge_onto_parent",
                                   "merge_into_checkpoint_file"])
def test_output_that_would_replace_the_input_is_refused_even_with_force(where, tmp_path, small_ckpt):
    """'-o' naming the input (or a directory holding it) would delete the user's only copy."""
    (tmp_path / "work").mkdir()
    src = write_weights(tmp_path / "work" / "w.safetensors")
    ckpt = shutil.copytree(small_ckpt, tmp_path / "work" / "c.lors")
    args = {"same_file": ["convert", src, "--arch", ARCH, "-o", src],
            "parent_dir": ["convert", src, "--arch", ARCH, "-o", tmp_path / "work"],
            "merge_onto_checkpoint": ["merge", ckpt, "-o", ckpt],
            "merge_onto_parent": ["merge", ckpt, "-o", tmp_path / "work"],
            "merge_into_checkpoint_file": ["merge", ckpt, "-o", ckpt / "model.safetensors"]}[where]
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


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="running as root: chmod 0o555 does not stop root from writing "
                           "(test_output_under_a_regular_file covers unwritable outputs)")
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
    res = run("convert", write_weights(tmp_path / "small.safetensors"), "--arch", ARCH, "--rank", "4",
              "-o", out, "-q")
    assert res.exit_code == 0, res.output
    old = tree_state(out)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "lors_convert", "convert", str(src), "--arch",
                             "tests.archs_big:big_embed_mlp", "--rank", "4", "-o", str(out), "--force", "-q"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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
    assert killed_while_writing, f"the conversion ended before it could be killed mid-write: " \
                                 f"rc={proc.returncode} {proc.stderr.read().decode()[-500:]}"
    assert proc.returncode == -signal.SIGKILL
    assert tree_state(out) == old, "the previous output changed"
    visible = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert visible == ["big.safetensors", "out.lors", "small.safetensors"]
    # the killed run can leave only its hidden temp dir, never a partial out.lors
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers and all(p.name.startswith(".out.lors.tmp-") for p in leftovers)
    assert Checkpoint(out).report() is not None
    # the next write of out.lors sweeps the dead run's temp dir
    res = run("convert", tmp_path / "small.safetensors", "--arch", ARCH, "--rank", "4", "-o", out, "--force", "-q")
    assert res.exit_code == 0, res.output
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_sweep_removes_only_dead_local_temps(tmp_path):
    import socket

    from lors_convert.io.atomic import sweep_stale_temps

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
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
    assert sorted(p.name for p in removed) == sorted([entries["dead"].name, f".x.lors.tmp-{dead}@{host}.file"])
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
    "config_matrix_not_pair": (_edit(lambda c: c["stacks"][0]["params"][0].update(matrix=[64])),
                               ("matrix",)),
    "config_members_not_strings": (_edit(lambda c: c["stacks"][0].update(members=[1, 2, 3, 4])),
                                   ("members",)),
    "config_unknown_layer": (_edit(lambda c: c["stacks"][0]["params"][0].update(layer="rnn")),
                             ("unknown layer kind 'rnn'",)),
    "config_unknown_dtype": (_edit(lambda c: c["stacks"][0]["params"][0].update(dtype="float99")),
                             ("unknown dtype",)),
    "config_shared_unknown_name": (_edit(lambda c: c["stacks"][0]["params"][0].update(shared=["mean"])),
                                   ("shared must be ['shared'] or [] (private-only)",)),
    "config_shared_dropped": (_edit(lambda c: c["stacks"][0]["params"][0].update(shared=[])),
                              ("blocks.0.up.shared",)),
    "manifest_dtype_differs": (_edit(lambda c: c["manifest"]["keys"]["head.weight"].update(dtype="float16")),
                               ("head.weight", "float16")),
    "manifest_unknown_key": (_edit(lambda c: c["manifest"]["keys"].update({"ghost.weight": {
        "shape": [2], "dtype": "float32"}})), ("ghost.weight",)),
    "metadata_invalid_json": (lambda ckpt: _rewrite_weights(ckpt, metadata={"lors_config": "{nope"}),
                              ("differs from the config",)),
    "missing_factor": (_drop_tensor("blocks.2.down.lors_B"), ("blocks.2.down.lors_B", "missing")),
    "missing_shared": (_drop_tensor("blocks.0.up.shared"), ("blocks.0.up.shared", "missing")),
    "missing_untouched": (_drop_tensor("head.weight"), ("head.weight", "missing")),
    "factor_wrong_shape": (_reshape_tensor("blocks.1.up.lors_A"), ("blocks.1.up.lors_A", "shape")),
    "untouched_wrong_shape": (_reshape_tensor("embed.weight"), ("embed.weight", "[33, 8]")),
    "untouched_wrong_dtype": (_retype_tensor("head.bias"), ("head.bias", "float16")),
    "weights_missing": (lambda ckpt: (ckpt / "model.safetensors").unlink(), ("missing weight file",)),
    "weights_truncated": (_truncate("model.safetensors", 500), ("not a readable safetensors",)),
    "weights_header_oversized": (lambda ckpt: _write("model.safetensors", struct.pack("<Q", 2**62) + (
        ckpt / "model.safetensors").read_bytes()[8:])(ckpt), ("not a readable safetensors",)),
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
    res = run("convert", write_weights(d / "w.safetensors"), "--arch", ARCH, "--rank", "4", "-o", out, "-q",
              "--max-shard-size", "20KB")
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
    "index_points_outside": (_index(lambda m: m.update({"head.weight": "../../../etc/hostname"})),
                             ("outside",)),
    "index_names_missing_shard": (_index(lambda m: m.update({"head.weight": "model-00009-of-00009.safetensors"})),
                                  ("missing weight file",)),
    "shard_deleted": (lambda ckpt: _first_shard(ckpt).unlink(), ("missing weight file",)),
    "shard_truncated": (lambda ckpt: _first_shard(ckpt).write_bytes(_first_shard(ckpt).read_bytes()[:100]),
                        ("not a readable safetensors",)),
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
    (ckpt / "report.json").write_text("{\"stacks\": [")
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


@pytest.mark.parametrize("model_fn, words", [
    (no_stacks, "does not match"),
    (lambda: StackedMLP(hidden=48), "does not match"),
    (lambda: StackedMLP(depth=3), "does not match"),
    (lambda: StackedMLP(depth=5), "do not match"),
])
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


JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 200) | st.floats(allow_nan=False)
                    | st.text(max_size=8), _containers, max_leaves=8)


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
    st.tuples(st.just("header_bytes"), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                                min_size=1, max_size=4)),
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
        (ckpt / "lors_config.json").write_bytes(data[:pos] + mutation[2] + data[pos + len(mutation[2]):])


@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(mutation=MUTATIONS)
def test_fuzz_checkpoint_reader(mutation, small_ckpt, sharded_ckpt):
    with tempfile.TemporaryDirectory() as d:
        ckpt = shutil.copytree(sharded_ckpt if mutation[0] == "index" else small_ckpt, Path(d) / "c.lors")
        _mutate(ckpt, mutation)
        for fn in (lambda: Checkpoint(ckpt).report(),
                   lambda: merge_checkpoint(ckpt, Path(d) / "m.safetensors", force=True),
                   lambda: lors_convert.load(ckpt)):
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
