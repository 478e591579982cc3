"""The CLI's thread settings: OpenMP threads sleep at barriers when other work is runnable, the pool
fits the usable CPUs, the user's environment wins, and nothing changes once torch is imported."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

from lors_convert.threads import configure_threads, other_runnable_tasks, runnable_now, usable_cpus

ROOT = Path(__file__).resolve().parents[1]
SHOW = (
    "import os, sys\nfrom lors_convert.cli import main\nsys.argv = ['lors', '--help']\n"
    "try:\n    main()\nexcept SystemExit:\n    pass\n"
    "import torch\n"
    "print(os.environ.get('OMP_WAIT_POLICY', 'default'), os.environ['OMP_NUM_THREADS'], torch.get_num_threads(), file=sys.stderr)"
)


def _python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``code`` run by a fresh interpreter in the repository, with no OMP_ variable but ``env``'s."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")} | (env or {})
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def _run(env: dict) -> list[str]:
    return _python(SHOW, env).stderr.strip().splitlines()[-1].split()


def _spin() -> None:
    while True:
        pass


def test_beside_busy_processes_the_cli_lets_threads_sleep_and_sizes_the_pool_by_the_usable_cpus():
    cpus = str(len(os.sched_getaffinity(0)))
    spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(2)]
    for s in spinners:
        s.start()
    try:
        assert other_runnable_tasks() >= 2
        assert _run({}) == ["PASSIVE", cpus, cpus]
    finally:
        for s in spinners:
            s.terminate()


def test_the_wait_policy_follows_the_other_runnable_tasks():
    code = (
        "from lors_convert.threads import configure_threads\n"
        "for others in (0, 1, 3, None):\n"
        "    env = {}\n"
        "    print(configure_threads(env, others=others), env.get('OMP_WAIT_POLICY', 'default'))\n"
    )
    res = _python(code)
    assert res.stdout.split("\n")[:4] == ["True default", "True PASSIVE", "True PASSIVE", "True PASSIVE"]
    assert runnable_now("0.52 0.58 0.59 3/240 1234\n") == 3


def test_the_users_settings_win():
    assert _run({"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1"}) == ["ACTIVE", "1", "1"]


def test_nothing_changes_once_torch_is_imported():
    import torch  # noqa: F401  (the test process has it already; imported here to say so)

    env: dict = {}
    assert configure_threads(env) is False and env == {}


def test_usable_cpus_follows_the_affinity_mask():
    assert usable_cpus() == len(os.sched_getaffinity(0))


def test_lapack_runs_on_one_thread_only_on_a_shared_machine(monkeypatch):
    """A factorization keeps torch's threads alone and takes one beside other work (the policy the
    CLI set: threads that sleep at barriers); the thread count is restored after either."""
    import torch

    from lors_convert.decompose.topk import lapack_threads

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for policy, inside in (("PASSIVE", 1), ("passive", 1), ("ACTIVE", 2), (None, 2)):
            if policy is None:
                monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
            else:
                monkeypatch.setenv("OMP_WAIT_POLICY", policy)
            with lapack_threads():
                assert torch.get_num_threads() == inside, policy
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
