"""Where a ``lors`` command's memory peaks: RSS sampled with the phase it was in.

Runs ``python -m lors_convert ARGS`` in this process with a thread that reads ``VmRSS`` every
``--every`` seconds together with the main thread's innermost ``lors_convert`` frames, then prints
the peak, the phases ranked by the highest RSS seen in them, and a coarse timeline. The phase is
what the code was doing when sampled, so a short spike between samples can be missed; ``wait4``'s
peak (``scripts/bench_calibrate.py``) is the figure to quote, this says where it comes from.

    HF_HUB_OFFLINE=1 python scripts/phase_memory.py -- convert SRC --budget 0.6 -o /tmp/out.lors --force
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import threading
import time
import traceback

DEPTH = 3  # innermost lors_convert frames that name a phase


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def phase(frame) -> str:
    """The innermost ``lors_convert`` frames of a stack, outermost first."""
    frames = [f for f in traceback.extract_stack(frame) if f"{os.sep}lors_convert{os.sep}" in f.filename]
    return " > ".join(f"{os.path.basename(f.filename)}:{f.name}" for f in frames[-DEPTH:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--every", type=float, default=0.1, help="seconds between samples")
    p.add_argument("--top", type=int, default=12, help="phases to list")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the lors command line, after --")
    args = p.parse_args()
    command = [a for a in args.args if a != "--"] if args.args[:1] == ["--"] else args.args
    samples: list[tuple[float, int, str]] = []  # (seconds, RSS bytes, phase)
    main_thread, start, done = threading.get_ident(), time.perf_counter(), threading.Event()

    def sample() -> None:
        while not done.wait(args.every):
            frame = sys._current_frames().get(main_thread)
            samples.append((time.perf_counter() - start, rss_bytes(), phase(frame) if frame else ""))

    threading.Thread(target=sample, daemon=True).start()
    sys.argv = ["lors", *command]
    try:
        runpy.run_module("lors_convert", run_name="__main__")
    except SystemExit as stop:
        if stop.code not in (0, None):
            print(f"the command exited with {stop.code}", file=sys.stderr)
    finally:
        done.set()
    report(samples, args.top)


def report(samples: list[tuple[float, int, str]], top: int) -> None:
    if not samples:
        print("no samples: the command ended before the first one")
        return
    peak = max(samples, key=lambda s: s[1])
    print(f"peak {peak[1] / 1e9:.2f} GB at {peak[0]:.0f} s in {peak[2] or '(outside lors_convert)'}\n")
    highest: dict[str, int] = {}
    for _, rss, where in samples:
        highest[where] = max(highest.get(where, 0), rss)
    print("| highest RSS | phase |\n|---|---|")
    for where, rss in sorted(highest.items(), key=lambda item: -item[1])[:top]:
        print(f"| {rss / 1e9:.2f} GB | {where or '(outside lors_convert)'} |")
    step = max(1.0, samples[-1][0] / 40)  # about 40 timeline rows
    print("\n| time | RSS | phase |\n|---|---|---|")
    last = -step
    for seconds, rss, where in samples:
        if seconds - last >= step:
            print(f"| {seconds:.0f} s | {rss / 1e9:.2f} GB | {where} |")
            last = seconds


if __name__ == "__main__":
    main()
