"""Bad paths: an input that is not there is a usage error (exit 2) that names it.

Missing model files and directories for ``convert``, ``report`` and ``merge``, a missing checkpoint,
``--data``, ``--calibrate`` or ``--heldout`` file, and an ``--arch`` whose package does not exist.
Each fails cleanly (see tests/badcase.py): one line, nothing written.
"""

from __future__ import annotations

import pytest

from tests.badcase import (
    ARCH,
    Case,
    calib_conv,
    case_ids,
    check_case,
    conv,
    convert_args,
    copy_in,
    good_tensors,
    grouped,
    heal_args,
    in_path,
)

PATHS = [
    Case("missing_file", convert_args(lambda t: in_path(t, "missing.pt")), 2, ("no such file",)),
    Case("missing_file_report", lambda t: ["report", in_path(t, "missing.lors")], 2, ("no such file",)),
    Case(
        "missing_file_merge",
        lambda t: ["merge", in_path(t, "missing.lors")],
        2,
        ("no such file",),
        out="merged",
    ),
    Case(
        "convert_missing_safetensors",
        lambda t: ["convert", in_path(t, "nope.safetensors"), "--arch", ARCH],
        2,
        ("no such file",),
    ),
    Case("convert_missing_directory", lambda t: ["convert", in_path(t, "nope_dir")], 2, ("no such file",)),
    Case(
        "report_missing_source",
        lambda t: ["report", in_path(t, "nope.pt"), "--arch", ARCH],
        2,
        ("no such file",),
    ),
    Case(
        "heal_missing_checkpoint",
        lambda t: ["heal", in_path(t, "nope.lors"), "--data", good_tensors(t)],
        2,
        ("no such file",),
    ),
    Case(
        "heal_missing_data",
        lambda t: ["heal", copy_in(t, "mlp.lors"), "--arch", ARCH, "--data", in_path(t, "nope.txt")],
        2,
        ("does not exist",),
        names="{tmp}/in/nope.txt",
    ),
    Case(
        "heal_missing_heldout",
        lambda t: [*heal_args()(t), "--heldout", in_path(t, "nope.pt")],
        2,
        ("does not exist",),
        names="{tmp}/in/nope.pt",
    ),
    Case(
        "convert_missing_calibrate",
        conv("--calibrate", "/nonexistent/calib.txt"),
        2,
        ("does not exist",),
        names="/nonexistent/calib.txt",
    ),
    Case(
        "convert_missing_heldout",
        lambda t: [*calib_conv()(t), "--heldout", in_path(t, "nope.safetensors")],
        2,
        ("does not exist",),
        names="{tmp}/in/nope.safetensors",
    ),
    Case(
        "arch_package_missing",
        conv("--arch", "no_such_package_xyz:build"),
        2,
        ("no_such_package_xyz",),
        names=None,
    ),
]


grouped("paths", PATHS)


@pytest.mark.parametrize("case", PATHS, ids=case_ids(PATHS))
def test_bad_path(case: Case, tmp_path):
    check_case(case, tmp_path)
