"""Reproducible outputs: the same command in two separate processes writes the same bytes.

Each command runs twice as ``python -m lors_convert ...`` (fresh interpreters: no state shared
between the runs, hash seeds differ) into two outputs, and every output file's sha256 must match:
a streamed conversion of a Hugging Face directory (side files copied), a calibrated conversion
under a budget (output-gradient probes), ``merge`` to a directory and to one file, and a seeded
``heal``. Nothing in an output may name the output itself or a temporary entry, and the heal
state never lands in an output. (Two-process ``torchrun``: tests/test_streaming.py.)
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.models import StackedMLP

ROOT = Path(__file__).resolve().parents[1]
ARCH = "tests.models:stacked_mlp"


def lors_twice(cwd: Path, *args, outputs: tuple[str, str] = ("one", "two")) -> tuple[Path, Path]:
    """Run ``lors ARGS -o OUTPUT`` in two processes at once; return the two outputs."""
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "lors_convert", *map(str, args), "-o", str(cwd / out), "-q"],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for out in outputs
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    return cwd / outputs[0], cwd / outputs[1]


def digests(path: Path) -> dict[str, str]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {
        str(p.relative_to(path)) if path.is_dir() else p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in files
    }


def assert_same_bytes(a: Path, b: Path) -> None:
    da, db = digests(a), digests(b)
    if a.is_file():  # single files are compared by content (their names differ)
        assert list(da.values()) == list(db.values())
    else:
        assert da == db and da, (da, db)
    for path, out in ((a, a), (b, b)):
        for f in [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]:
            data = f.read_bytes()
            assert str(out).encode() not in data, f"{f} names its own output {out}"
            assert b".tmp-" not in data and b".old-" not in data and b"heal-state" not in data, f


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("repro")
    torch.manual_seed(0)
    save_file(StackedMLP().state_dict(), str(d / "w.safetensors"))
    save_file({"input": torch.randn(48, 8)}, str(d / "calib.safetensors"))
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(
        GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    ).save_pretrained(d / "gpt2")
    (d / "gpt2" / "vocab.json").write_text('{"a": 0}')  # a side file the conversion copies along
    return d


@pytest.fixture(scope="module")
def streamed(work) -> tuple[Path, Path]:
    return lors_twice(
        work,
        "convert",
        work / "gpt2",
        "--rank",
        "4",
        "--max-shard-size",
        "40KB",
        outputs=("g1.lors", "g2.lors"),
    )


@pytest.fixture(scope="module")
def calibrated(work) -> tuple[Path, Path]:
    return lors_twice(
        work,
        "convert",
        work / "w.safetensors",
        "--arch",
        ARCH,
        "--calibrate",
        work / "calib.safetensors",
        "--budget",
        "0.5",
        "--refine",
        "1",
        outputs=("c1.lors", "c2.lors"),
    )


def test_streamed_conversion_is_byte_identical_across_processes(streamed):
    a, b = streamed
    assert (a / "vocab.json").is_file() and len(list(a.glob("model-*.safetensors"))) > 1
    assert_same_bytes(a, b)


def test_calibrated_budget_conversion_is_byte_identical_across_processes(calibrated):
    assert_same_bytes(*calibrated)


@pytest.mark.parametrize("kind", ["directory", "file"])
def test_merge_is_byte_identical_across_processes(kind, work, streamed):
    names = ("m1", "m2") if kind == "directory" else ("m1.safetensors", "m2.safetensors")
    a, b = lors_twice(work, "merge", streamed[0], "--max-shard-size", "40KB", outputs=names)
    if kind == "directory":
        assert (a / "config.json").is_file() and (a / "vocab.json").is_file()
        assert (a / "model.safetensors.index.json").is_file()
    assert_same_bytes(a, b)


def test_heal_is_byte_identical_across_processes(work, calibrated):
    a, b = lors_twice(
        work,
        "heal",
        calibrated[0],
        "--arch",
        ARCH,
        "--data",
        work / "calib.safetensors",
        "--steps",
        "6",
        outputs=("h1.lors", "h2.lors"),
    )
    # the report records how long healing took; everything else is the same bytes
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (a, b))
    assert _without_timings(ra) == _without_timings(rb) and ra["quality"]["heal_seconds"] >= 0
    for d in (a, b):
        (d / "report.json").unlink()
    assert_same_bytes(a, b)
    assert not [
        p.name for p in work.iterdir() if "heal-state" in p.name
    ]  # removed once the output is written


def _without_timings(value):
    """A report with every wall-clock figure (keys ending in "seconds") left out."""
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if not k.endswith("seconds")}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value
