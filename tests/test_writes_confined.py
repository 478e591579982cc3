"""No command writes outside its output.

Every command runs as a fresh ``python -m lors_convert`` process inside one directory tree that
holds its inputs, its working directory, and its ``HOME``, ``TMPDIR`` and cache directories
(``XDG_CACHE_HOME``, ``HF_HOME``, ``MPLCONFIGDIR``). After each command the tree is compared with
the one before: the only entries added, changed or removed are OUT and what lies inside it. No
hidden temporary, heal state, cache or lock file is left anywhere, inputs are unchanged, and a dry
run, a report and a failing command change nothing at all.
"""

from __future__ import annotations

import hashlib
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


def snapshot(root: Path) -> dict[str, str]:
    state = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            state[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            state[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            state[rel] = "dir"
    return state


def changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tree")
    for d in ("inputs", "work", "home", "tmp", "cache"):
        (root / d).mkdir()
    torch.manual_seed(0)
    save_file(StackedMLP().state_dict(), str(root / "inputs" / "w.safetensors"))
    save_file({"input": torch.randn(40, 8)}, str(root / "inputs" / "calib.safetensors"))
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    ).save_pretrained(root / "inputs" / "gpt2")
    return root


def lors(tree: Path, *args) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "HOME": str(tree / "home"),
        "TMPDIR": str(tree / "tmp"),
        "XDG_CACHE_HOME": str(tree / "cache"),
        "HF_HOME": str(tree / "cache" / "hf"),
        "MPLCONFIGDIR": str(tree / "cache" / "mpl"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "lors_convert", *map(str, args)],
        cwd=tree / "work",
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


# (command line with {in} = inputs, {out} = the output relative to work/; the output path or None)
COMMANDS = [
    ("convert {in}/gpt2 --rank 4 -o g.lors -q", "work/g.lors"),
    ("convert {in}/gpt2 --rank 2 -o g.lors --force -q", "work/g.lors"),  # replaces it
    (
        "convert {in}/w.safetensors --arch "
        + ARCH
        + " --calibrate {in}/calib.safetensors --budget 0.5 -o c.lors -q",
        "work/c.lors",
    ),
    ("convert {in}/gpt2 --rank 4 --dry-run -q", None),
    ("report g.lors --json", None),
    ("report {in}/gpt2 --ranks 2,4 --json", None),
    ("merge g.lors -o dense -q", "work/dense"),
    ("merge g.lors -o dense.safetensors -q", "work/dense.safetensors"),
    (
        "heal c.lors --arch " + ARCH + " --data {in}/calib.safetensors --steps 3 -o healed.lors -q",
        "work/healed.lors",
    ),
    (
        "heal c.lors --arch " + ARCH + " --data {in}/calib.safetensors --steps 3 -o healed.lors -q",
        None,
    ),  # exists
]


def test_no_command_writes_outside_its_output(tree):
    for line, out in COMMANDS:
        args = line.replace("{in}", str(tree / "inputs")).split()
        before = snapshot(tree)
        res = lors(tree, *args)
        after = snapshot(tree)
        if out is None:
            assert changed(before, after) == set(), (line, sorted(changed(before, after)))
            continue
        assert res.returncode == 0, (line, res.stderr[-2000:])
        outside = {k for k in changed(before, after) if k != out and not k.startswith(out + os.sep)}
        assert not outside, (line, sorted(outside))
        assert out in after, line
    assert (
        res.returncode == 2 and "already exists" in res.stderr
    )  # the last command: refused, nothing written
