"""Bad outputs: an output that exists, that would replace an input, or that cannot be written.

Without ``--force`` an existing output is refused (exit 2); even with ``--force``, an output that
is one of the inputs or a directory holding one is refused (exit 2); an output below a regular file
or in a read-only directory is a clean runtime error (exit 1). Nothing on disk changes.
"""

from __future__ import annotations

import os
import shutil

import pytest

from tests.badcase import (
    ARCH,
    Case,
    assert_clean_failure,
    calib_conv,
    case_ids,
    check_case,
    good_tensors,
    grouped,
    heal_args,
    old_output,
    run,
    tree_state,
    write_weights,
)

OUTPUTS = [
    Case(
        "convert_onto_calibration_file",
        lambda t: [*calib_conv()(t), "--force"],
        2,
        ("would replace the input",),
        names="{tmp}/in/calib.safetensors",
        out="in/calib.safetensors",
    ),
    Case(
        "convert_onto_heldout_file",
        lambda t: [*calib_conv()(t), "--heldout", good_tensors(t, "held.safetensors"), "--force"],
        2,
        ("would replace the input",),
        names="{tmp}/in/held.safetensors",
        out="in/held.safetensors",
    ),
    Case(
        "heal_onto_its_checkpoint",
        lambda t: [*heal_args()(t), "--force"],
        2,
        ("would replace the input",),
        names="{tmp}/in/mlp.lors",
        out="in/mlp.lors",
    ),
    Case(
        "heal_onto_its_data",
        lambda t: [*heal_args()(t), "--force"],
        2,
        ("would replace the input",),
        names="{tmp}/in/calib.safetensors",
        out="in/calib.safetensors",
    ),
    Case(
        "heal_onto_the_input_directory",
        lambda t: [*heal_args()(t), "--force"],
        2,
        ("would replace the input",),
        names="{tmp}/in/mlp.lors",
        out="in",
    ),
    Case(
        "heal_output_exists",
        lambda t: [old_output(t / "out.lors"), *heal_args()(t)][1:],
        2,
        ("already exists", "--force"),
        names="{tmp}/out.lors",
    ),
]

grouped("outputs", OUTPUTS)


@pytest.mark.parametrize("case", OUTPUTS, ids=case_ids(OUTPUTS))
def test_bad_output(case: Case, tmp_path):
    check_case(case, tmp_path)


@pytest.mark.parametrize("command", ["convert", "merge", "merge_file"])
def test_existing_output_is_refused_without_force(command, tmp_path, small_ckpt):
    src = write_weights(tmp_path / "w.safetensors")
    if command == "convert":
        out = old_output(tmp_path / "out.lors")
        args = ["convert", src, "--arch", ARCH, "--rank", "4", "-o", out]
    else:
        ckpt = shutil.copytree(small_ckpt, tmp_path / "c.lors")
        out = tmp_path / ("m.safetensors" if command == "merge_file" else "merged")
        if command == "merge_file":
            out.write_bytes(b"precious")
        else:
            old_output(out)
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
