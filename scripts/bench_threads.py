"""OpenMP's wait policy on a shared machine: many small products (the shape of the calibrated
conversion's conjugate gradients and per-layer solves), timed in fresh processes with OpenMP's
default (spin, then sleep), with ``OMP_WAIT_POLICY=PASSIVE``, and with what the ``lors`` CLI chooses
(``lors_convert.threads.configure_threads``: PASSIVE only when other work is runnable), alone and
beside ``--busy N`` competing CPU-bound processes, interleaved over ``--rounds``; medians.

    python scripts/bench_threads.py --busy 2 --rounds 3
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import sys
from pathlib import Path

from benchdoc import recorded, table

ROOT = Path(__file__).resolve().parents[1]

LORS = "from lors_convert.threads import configure_threads\nconfigure_threads()\n"
WORK = r"""
import time, torch
torch.manual_seed(0)
a, b = torch.randn(576, 576), torch.randn(576, 64)
start = time.perf_counter()
for _ in range(2000):
    b = torch.tanh(a @ b)
print(time.perf_counter() - start)
"""


def _spin() -> None:
    while True:
        pass


def timed(policy: str) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    env["PYTHONPATH"] = str(ROOT)
    if policy == "PASSIVE":
        env["OMP_WAIT_POLICY"] = policy
    code = (LORS if policy == "lors" else "") + WORK
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def measure(rounds: int) -> dict[str, float]:
    runs: dict[str, list[float]] = {"default": [], "PASSIVE": [], "lors": []}
    for _ in range(rounds):
        for policy, times in runs.items():
            times.append(timed(policy))
    return {k: statistics.median(v) for k, v in runs.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--busy", type=int, default=2, help="competing CPU-bound processes")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    alone = measure(args.rounds)
    spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.busy)]
    for s in spinners:
        s.start()
    try:
        busy = measure(args.rounds)
    finally:
        for s in spinners:
            s.terminate()
    print(f"2000 products (576x576 @ 576x64), {os.cpu_count()} CPUs, medians of {args.rounds} rounds\n")
    rows = [[f"alone, {k}", f"{alone[k]:.2f} s", f"{alone[k] / alone['default']:.2f}x"] for k in alone] + [
        [f"{args.busy} busy processes beside it, {k}", f"{busy[k]:.2f} s", f"{busy[k] / alone[k]:.2f}x"]
        for k in busy
    ]
    print(table(["run", "time", "vs default alone / vs itself alone"], rows))


if __name__ == "__main__":
    with recorded("threads", "Threads on a shared machine"):
        main()
