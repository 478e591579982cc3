"""A heal state that must not be resumed: ``heal`` refuses it with a usage error (exit 2) that names it.

A state left beside the output by an interrupted ``heal`` with other settings (steps, learning rate,
loss, match, trainable parameters, data, model shapes), and state files that are corrupt, empty,
truncated, from another version, not a dict, without the optimizer, a directory or a symlink. Each
must fail cleanly (see tests/badcase.py); ``--force`` starts afresh.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lors_convert.checkpoint import Checkpoint
from tests.badcase import (
    ARCH,
    Case,
    case_ids,
    check_case,
    copy_in,
    good_tensors,
    grouped,
    outside,
    run,
    template,
    torch_bytes,
)


def _heal_state(**given):
    """A state left by ``heal`` with other settings (interrupted after 2 steps) at the CLI's path."""

    def build(t):
        settings = dict(given)
        import lors_convert
        from lors_convert.calibrate.data import load_calibration
        from lors_convert.heal import heal
        from lors_convert.io.sources import load_source

        ckpt = copy_in(t, settings.pop("ckpt", "mlp.lors"))
        data = good_tensors(t)
        other = good_tensors(t, "other.safetensors", n=30) if settings.pop("other_data", False) else data
        teacher, _ = load_source(template("mlp.safetensors"), arch=ARCH)
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
        return ["heal", copy_in(t, "mlp.lors", "c.lors"), "--arch", ARCH, "--data", data, "--steps", "4"]

    return build


def _state_file(make):
    def build(t):
        make(t / ".out.lors.heal-state.pt")
        return ["heal", copy_in(t, "mlp.lors"), "--arch", ARCH, "--data", good_tensors(t), "--steps", "4"]

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
    target = outside(path.parent, "state.pt", torch_bytes({"version": 2}))
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
        _state_file(lambda p: p.write_bytes(torch_bytes({"version": 1, "step": 2}))),
        2,
        ("another version of lors",),
    ),
    Case(
        "not_a_dict",
        _state_file(lambda p: p.write_bytes(torch_bytes([1, 2, 3]))),
        2,
        ("cannot read the heal state",),
    ),
    Case("without_optimizer", _state_file(_state_without("optimizer")), 2, ("cannot resume",)),
    Case("directory", _state_file(lambda p: p.mkdir()), 2, ("not a regular file",)),
    Case("symlink", _state_file(_state_link), 2, ("not a regular file",)),
]
for case in grouped("heal_state", HEAL_STATE):
    case.names = "{tmp}/.out.lors.heal-state.pt"


@pytest.mark.parametrize("case", HEAL_STATE, ids=case_ids(HEAL_STATE))
def test_heal_state_is_refused(case: Case, tmp_path):
    check_case(case, tmp_path)


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
    assert not state.exists()
    healed, converted = Checkpoint(tmp_path / "out.lors").report(), Checkpoint(template("mlp.lors")).report()
    assert healed.params_after == converted.params_after  # healing moves values, not shapes
    assert [m.ranks for s in healed.stacks for m in s.matrices] == [[4] * 4] * 2  # up and down at rank 4
