"""Replacing an output: SIGKILL at every step of ``--force`` never loses it.

A child process runs ``lors convert ... --force`` onto an existing checkpoint with one step of
:func:`lors_convert.io.atomic.atomic_output` wrapped to SIGKILL itself there (the functions are
monkeypatched in the child only). Two ways to swap: ``renameat2(RENAME_EXCHANGE)`` (one step) and
the fallback where it is unavailable (two renames through a hidden ``.OUT.old-*`` directory).
After the kill, OUT is the complete previous or new checkpoint (the fallback killed between its
renames leaves it absent: the next lors command reading OUT restores it), and the next write of
OUT leaves no hidden entry behind. Then the pieces on their own: the exchange, the recovery of
an output a dead run left absent, and the sweep of temporaries that only dead local runs left.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from lors_convert.cli import app
from lors_convert.io import atomic
from tests.models import StackedMLP

ROOT = Path(__file__).resolve().parents[1]
ARCH = "tests.models:stacked_mlp"
runner = CliRunner()

CHILD = r"""
import os, signal, sys
from pathlib import Path
import lors_convert.io.atomic as atomic

swap, where = os.environ["KILL_AT"].split("/")
calls = {"rename": 0}

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if swap == "fallback":
    atomic.exchange = lambda a, b: False  # as on a system without renameat2
real_exchange, real_rename, real_remove = atomic.exchange, atomic._rename, atomic._remove

def exchange(a, b):
    if where == "before_swap":
        die()
    done = real_exchange(a, b)
    if where == "after_swap" and done:
        die()
    return done

def rename(src, dst):
    calls["rename"] += 1
    if where == "before_first_rename":
        die()
    real_rename(src, dst)
    if where == "between_renames" and calls["rename"] == 1:
        die()
    if where == "after_swap" and calls["rename"] == 2:
        die()

def remove(path):  # removing the previous output: one file gone, then killed
    if where == "removing_old" and Path(path).is_dir():
        files = sorted(p for p in Path(path).rglob("*") if p.is_file())
        if files:
            files[0].unlink()
        die()
    real_remove(path)

atomic.exchange, atomic._rename, atomic._remove = exchange, rename, remove
from lors_convert.cli import main
sys.argv = ["lors"] + sys.argv[1:]
main()
"""

# (swap, step) -> which checkpoint OUT holds right after the kill ("absent": restored by the next reader)
STEPS = {
    ("exchange", "before_swap"): "old",
    ("exchange", "after_swap"): "new",
    ("exchange", "removing_old"): "new",
    ("fallback", "before_first_rename"): "old",
    ("fallback", "between_renames"): "absent",
    ("fallback", "after_swap"): "new",
    ("fallback", "removing_old"): "new",
}


def tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The source and the trees of the previous (rank 4) and the new (rank 2) checkpoint."""
    d = tmp_path_factory.mktemp("atomic")
    torch.manual_seed(0)
    src = d / "w.safetensors"
    save_file(StackedMLP().state_dict(), str(src))
    trees = {}
    for name, rank in (("old", "4"), ("new", "2")):
        res = runner.invoke(
            app, ["convert", str(src), "--arch", ARCH, "--rank", rank, "-o", str(d / name), "-q"]
        )
        assert res.exit_code == 0, res.output
        trees[name] = tree(d / name)
    assert trees["old"] != trees["new"]
    return src, trees


@pytest.mark.skipif(atomic._renameat2() is None, reason="no renameat2 in this C library")
@pytest.mark.parametrize("swap, step", list(STEPS), ids=[f"{a}-{b}" for a, b in STEPS])
def test_sigkill_while_replacing_an_output(swap, step, checkpoints, tmp_path):
    src, trees = checkpoints
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out.lors"
    res = runner.invoke(app, ["convert", str(src), "--arch", ARCH, "--rank", "4", "-o", str(out), "-q"])
    assert res.exit_code == 0 and tree(out) == trees["old"]
    env = {
        **os.environ,
        "KILL_AT": f"{swap}/{step}",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            "convert",
            str(src),
            "--arch",
            ARCH,
            "--rank",
            "2",
            "-o",
            str(out),
            "--force",
            "-q",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == -signal.SIGKILL, (child.returncode, child.stderr[-2000:])
    assert hidden(work), "the kill left no trace: it did not happen where the test says"
    expected = STEPS[(swap, step)]
    if expected == "absent":
        assert not out.exists()  # the window the fallback cannot close: the next command restores OUT
        assert any(name.startswith(".out.lors.old-") for name in hidden(work))
        expected = "old"
    else:
        assert tree(out) == trees[expected]
    res = runner.invoke(app, ["report", str(out), "--json"])  # any command reading OUT restores and uses it
    assert res.exit_code == 0, res.output
    assert tree(out) == trees[expected]
    assert not any(".old-" in name for name in hidden(work))  # the dead run's old copy is gone
    res = runner.invoke(
        app, ["convert", str(src), "--arch", ARCH, "--rank", "2", "-o", str(out), "--force", "-q"]
    )
    assert res.exit_code == 0, res.output
    assert tree(out) == trees["new"] and hidden(work) == []


def test_exchange_swaps_a_file_and_a_directory(tmp_path):
    if atomic._renameat2() is None:
        pytest.skip("no renameat2 in this C library")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("x")
    (tmp_path / "f").write_text("f")
    assert atomic.exchange(tmp_path / "d", tmp_path / "f")
    assert (tmp_path / "d").read_text() == "f" and (tmp_path / "f" / "x").read_text() == "x"


def test_recover_leaves_live_and_foreign_entries_alone(tmp_path):
    import socket

    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead, host = int(done.stdout), socket.gethostname()
    out = tmp_path / "x.lors"
    live = tmp_path / f".x.lors.old-{os.getpid()}@{host}.aaa"
    foreign = tmp_path / f".x.lors.old-{dead}@not-{host}.bbb"
    orphan = tmp_path / f".x.lors.old-{dead}@{host}.ccc"
    for entry, content in ((live, "live"), (foreign, "foreign"), (orphan, "orphan")):
        (entry / "x.lors").mkdir(parents=True)
        (entry / "x.lors" / "who").write_text(content)
    assert atomic.recover_output(out) == out
    assert (out / "who").read_text() == "orphan" and not orphan.exists()
    assert (live / "x.lors" / "who").read_text() == "live" and (foreign / "x.lors" / "who").exists()
    assert atomic.recover_output(out) is None  # OUT exists: nothing to restore, live entries kept


def test_sweep_removes_only_dead_local_temps(tmp_path):
    import socket

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
    removed = atomic.sweep_stale_temps(tmp_path, "x.lors")
    assert sorted(p.name for p in removed) == sorted(
        [entries["dead"].name, f".x.lors.tmp-{dead}@{host}.file"]
    )
    assert not entries["dead"].exists()
    assert all(p.exists() for k, p in entries.items() if k != "dead")
