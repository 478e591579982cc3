"""Calibrated conversion at scale: a Llama-2-7B-shaped config, per block, extrapolated to 32 layers.

A 7B model in bf16 is 13.5 GB of weights; this machine's disk and the time a 2-core run takes allow
only a few of its 32 layers. The bench writes the config with random bf16 weights at each of
``--layers`` (e.g. ``2,3``), runs ``lors convert SRC --budget B --calibrate TOKENS --json`` on it in
its own process (as a user would; wall time and peak RSS from ``wait4``), and fits
``time = a + b * layers`` and ``peak = c + d * layers`` through the runs: the per-block cost ``b``,
``d`` and what a 32-layer model would take, if the costs stay linear in the layer count (the
conversion holds one block's activations and Grams at a time, so what grows with the layers is the
weights and the per-block work). Random weights have flat spectra: this measures time and memory,
not fidelity.

    HF_HUB_OFFLINE=1 python scripts/bench_scale.py --layers 2,3 --samples 8 --seq 64
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from bench_calibrate import ROOT, make_llama, run_measured
from benchdoc import recorded

LLAMA_2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
FULL_LAYERS = 32
MACHINE_GB = 24


def line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``(intercept, slope)`` of ``ys`` on ``xs``."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="2,3", help="layer counts to run (at least two)")
    p.add_argument("--budget", type=float, default=0.6)
    p.add_argument("--samples", type=int, default=8, help="calibration sequences")
    p.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    args = p.parse_args()
    counts = sorted({int(n) for n in args.layers.split(",")})
    if len(counts) < 2:
        raise SystemExit("--layers needs at least two layer counts to fit a per-block cost")
    runs = []
    for layers in counts:
        work = Path(tempfile.mkdtemp(prefix="lors-bench-scale-"))
        try:
            src = work / "llama"
            tokens = make_llama(
                src, args.samples, args.seq, {**LLAMA_2_7B, "num_hidden_layers": layers}, "bfloat16"
            )
            cmd = [sys.executable, "-m", "lors_convert", "convert", str(src), "--budget", str(args.budget)]
            cmd += ["--calibrate", str(tokens), "--json", "-q", "-o", str(work / "out.lors")]
            seconds, peak, report = run_measured(cmd, ROOT)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        runs.append((layers, seconds, peak / 1e9, report["quality"].get("stacked_fraction")))
        print(f"{layers} layers: {seconds:.0f} s, {peak / 1e9:.2f} GB", file=sys.stderr)
    t0, t1 = line([r[0] for r in runs], [r[1] for r in runs])
    m0, m1 = line([r[0] for r in runs], [r[2] for r in runs])
    print(
        f"Llama-2-7B shape (hidden 4096, intermediate 11008, 32 heads, vocab 32000), random bf16 weights, "
        f"`--budget {args.budget}`, calibrated on {args.samples} x {args.seq} random tokens.\n"
    )
    print("| layers | wall | peak RSS | stacked kept |")
    print("|---|---|---|---|")
    for layers, seconds, peak, kept in runs:
        print(f"| {layers} | {seconds:.0f} s | {peak:.2f} GB | {kept:.3f} |")
    full_t, full_m = t0 + t1 * FULL_LAYERS, m0 + m1 * FULL_LAYERS
    print(
        f"| {FULL_LAYERS} (extrapolated) | {full_t / 60:.0f} min | {full_m:.1f} GB "
        f"({'fits' if full_m <= MACHINE_GB else 'does not fit'} {MACHINE_GB} GB) | |\n"
    )
    print(f"Per block: {t1:.0f} s and {m1:.2f} GB; fixed: {t0:.0f} s and {m0:.2f} GB.")


if __name__ == "__main__":
    with recorded("scale", "Calibrated conversion of a 7B-shaped Llama, per block"):
        main()
