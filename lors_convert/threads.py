"""How a lors process uses the CPU's threads: set before torch is imported, so the CLI does it first.

OpenMP, which runs torch's intra-op pool and MKL, lets a thread that reaches a barrier spin for a
while before it sleeps. Alone on a machine that is the fast choice: a heal step of SmolLM2 runs at
1.5x the tokens/s of threads that sleep at once, and many small products at 1.6x. On cores shared
with other work, the spinning thread burns the time slice its descheduled peer needs, and every
parallel region then waits a scheduler tick for it: the calibrated conversion's many small products
slow down tens of times. A thread that sleeps at once (``OMP_WAIT_POLICY=PASSIVE``) pays a futex
wake-up per region instead (docs/benchmarks.md, "Threads on a shared machine").

So the policy follows the machine at start: if other tasks are runnable on it (the kernel's count of
runnable tasks in ``/proc/loadavg``, the fewest of a few samples, less this process), threads sleep
at once; on an idle machine they keep OpenMP's default. Work that starts later, beside a running
lors, is not seen: set ``OMP_WAIT_POLICY=PASSIVE`` where that is the rule.

The pool's size is the number of CPUs this process may run on (``os.sched_getaffinity``: a
container, ``taskset`` or a batch scheduler may allow fewer than the machine has), not the number
the machine has. A value the user set in the environment always wins.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

SAMPLES = 5  # reads of the runnable count, SAMPLE_GAP apart: a task runnable in all of them is busy work
SAMPLE_GAP = 0.01  # seconds


def usable_cpus() -> int:
    """CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def runnable_now(loadavg: str) -> int:
    """Runnable tasks in a ``/proc/loadavg`` line (``0.52 0.58 0.59 3/240 1234``: 3)."""
    return int(loadavg.split()[3].split("/")[0])


def other_runnable_tasks(samples: int = SAMPLES, gap: float = SAMPLE_GAP) -> int | None:
    """Tasks other than this one that stay runnable over ``samples`` reads; None where unknown."""
    counts = []
    for i in range(samples):
        try:
            counts.append(runnable_now(Path("/proc/loadavg").read_text()))
        except (OSError, ValueError, IndexError):
            return None
        if i + 1 < samples:
            time.sleep(gap)
    return max(0, min(counts) - 1)  # this process is runnable while it reads


def wait_policy(others: int | None) -> str | None:
    """PASSIVE when other work is runnable (or it cannot be told), else None (OpenMP's default)."""
    return None if others == 0 else "PASSIVE"


def configure_threads(environ: dict | None = None, others: int | None = -1) -> bool:
    """Set ``OMP_WAIT_POLICY`` (PASSIVE on a busy machine) and ``OMP_NUM_THREADS`` = the usable CPUs,
    unless set. ``others``: the other runnable tasks (-1: count them now). Returns False (and changes
    nothing) when torch is already imported: OpenMP read its settings then."""
    if "torch" in sys.modules:
        return False
    env = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" not in env:
        policy = wait_policy(other_runnable_tasks() if others == -1 else others)
        if policy:
            env["OMP_WAIT_POLICY"] = policy
    env.setdefault("OMP_NUM_THREADS", str(usable_cpus()))
    return True
