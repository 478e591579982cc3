"""The CLI's thread settings: OpenMP threads sleep at barriers and the pool fits the usable CPUs,
unless the user's environment says otherwise; nothing changes once torch is imported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lors_convert.threads import configure_threads, usable_cpus

ROOT = Path(__file__).resolve().parents[1]
SHOW = (
    "import os, sys\nfrom lors_convert.cli import main\nsys.argv = ['lors', '--help']\n"
    "try:\n    main()\nexcept SystemExit:\n    pass\n"
    "import torch\n"
    "print(os.environ['OMP_WAIT_POLICY'], os.environ['OMP_NUM_THREADS'], torch.get_num_threads(), file=sys.stderr)"
)


def _run(env: dict) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")} | env
    res = subprocess.run(
        [sys.executable, "-c", SHOW], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    return res.stderr.strip().splitlines()[-1].split()


def test_cli_defaults_to_passive_waits_and_the_usable_cpus():
    cpus = str(len(os.sched_getaffinity(0)))
    assert _run({}) == ["PASSIVE", cpus, cpus]


def test_the_users_settings_win():
    assert _run({"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1"}) == ["ACTIVE", "1", "1"]


def test_nothing_changes_once_torch_is_imported():
    import torch  # noqa: F401  (the test process has it already; imported here to say so)

    env: dict = {}
    assert configure_threads(env) is False and env == {}


def test_usable_cpus_follows_the_affinity_mask():
    assert usable_cpus() == len(os.sched_getaffinity(0))
