"""How a lors process uses the CPU's threads: set before torch is imported, so the CLI does it first.

OpenMP, which runs torch's intra-op pool and MKL, lets a thread that reaches a barrier spin for a
while before it sleeps. Alone on a machine that costs nothing. On cores shared with other work, the
spinning thread burns the time slice its descheduled peer needs, and every parallel region then
waits a scheduler tick for it: the calibrated conversion's many small products (conjugate gradients,
per-layer eigensolvers, backward passes of 128 positions) slow down tens of times. A thread that
sleeps at once (``OMP_WAIT_POLICY=PASSIVE``) pays a futex wake-up per region instead
(docs/benchmarks.md, "Threads on a shared machine").

The pool's size is the number of CPUs this process may run on (``os.sched_getaffinity``: a
container, ``taskset`` or a batch scheduler may allow fewer than the machine has), not the number
the machine has. A value the user set in the environment always wins.
"""

from __future__ import annotations

import os
import sys


def usable_cpus() -> int:
    """CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def configure_threads(environ: dict | None = None) -> bool:
    """Default ``OMP_WAIT_POLICY=PASSIVE`` and ``OMP_NUM_THREADS`` = the usable CPUs, unless set.
    Returns False (and changes nothing) when torch is already imported: OpenMP read its settings then."""
    if "torch" in sys.modules:
        return False
    env = os.environ if environ is None else environ
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("OMP_NUM_THREADS", str(usable_cpus()))
    return True
