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

``--scale K`` divides the widths (hidden, intermediate, heads, vocabulary) by ``K``: every matrix,
Gram and eigenbasis is ``K^2`` times smaller, the activations ``K`` times, so above the RSS of a
process that only imports lors and transformers (``base``, measured), ``base + K^2 (peak - base)``
bounds the full-width peak from above, and a run takes minutes, not hours. Time does not scale
that simply (the eigendecompositions go as ``K^3``) and is not extrapolated.

    HF_HUB_OFFLINE=1 python scripts/bench_scale.py --layers 2,3 --samples 8 --seq 64
    HF_HUB_OFFLINE=1 python scripts/bench_scale.py --scale 4 --layers 2,4,8 --samples 8 --seq 64
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_calibrate import ROOT, make_llama, run_measured
from benchdoc import recorded

LLAMA_2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
VOCAB = 32000
# the base: its own peak from /proc (a child's ru_maxrss starts at its parent's peak when it execs)
IMPORTS_ONLY = (
    "import json, re, lors_convert.cli, transformers; from transformers import LlamaForCausalLM; "
    "kb = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1); "
    "print(json.dumps({'hwm': int(kb) * 1024}))"
)
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
    p.add_argument("--scale", type=int, default=1, help="divide every width by this (memory only)")
    args = p.parse_args()
    k = args.scale
    shape = {key: value // k for key, value in LLAMA_2_7B.items()}
    counts = sorted({int(n) for n in args.layers.split(",")})
    if len(counts) < 2:
        raise SystemExit("--layers needs at least two layer counts to fit a per-block cost")
    runs = []
    for layers in counts:
        work = Path(tempfile.mkdtemp(prefix="lors-bench-scale-"))
        try:
            src = work / "llama"
            tokens = make_llama(
                src, args.samples, args.seq, {**shape, "num_hidden_layers": layers}, "bfloat16", VOCAB // k
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
    widths = f"hidden {shape['hidden_size']}, intermediate {shape['intermediate_size']}, "
    widths += f"{shape['num_attention_heads']} heads, vocab {VOCAB // k}"
    print(
        f"Llama-2-7B shape{f' at 1/{k} width' if k > 1 else ''} ({widths}), random bf16 weights, "
        f"`--budget {args.budget}`, calibrated on {args.samples} x {args.seq} random tokens.\n"
    )
    print("| layers | wall | peak RSS | stacked kept |")
    print("|---|---|---|---|")
    for layers, seconds, peak, kept in runs:
        print(f"| {layers} | {seconds:.0f} s | {peak:.2f} GB | {kept:.3f} |")
    full_t, full_m = t0 + t1 * FULL_LAYERS, m0 + m1 * FULL_LAYERS
    if k == 1:
        print(
            f"| {FULL_LAYERS} (extrapolated) | {full_t / 60:.0f} min | {full_m:.1f} GB "
            f"({'fits' if full_m <= MACHINE_GB else 'does not fit'} {MACHINE_GB} GB) | |\n"
        )
        print(f"Per block: {t1:.0f} s and {m1:.2f} GB; fixed: {t0:.0f} s and {m0:.2f} GB.")
        return
    base = json.loads(subprocess.check_output([sys.executable, "-c", IMPORTS_ONLY], cwd=ROOT))["hwm"] / 1e9
    bound = base + k * k * (full_m - base)
    print(
        f"| {FULL_LAYERS} (extrapolated) | | {full_m:.2f} GB | |\n\n"
        f"Per block: {m1 * 1000:.0f} MB, fixed: {m0:.2f} GB; a process that only imports lors and "
        f"transformers: {base:.2f} GB. At full width, base + {k * k} x (peak - base), an upper bound: "
        f"{k * k * m1:.2f} GB per block, {bound:.1f} GB at {FULL_LAYERS} layers "
        f"({'fits' if bound <= MACHINE_GB else 'does not fit'} {MACHINE_GB} GB)."
    )


if __name__ == "__main__":
    if "--scale" in sys.argv:  # a section per width: the narrow runs bound the memory only
        k = sys.argv[sys.argv.index("--scale") + 1]
        section = (
            f"scale-1-{k}",
            f"Calibrated conversion of a 7B-shaped Llama at 1/{k} width: memory per block",
        )
    else:
        section = ("scale", "Calibrated conversion of a 7B-shaped Llama, per block")
    with recorded(*section):
        main()
