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
bounds the full-width peak from above, and a run takes minutes, not hours. The bound counts the
allocator's and the libraries' own memory, and the activations, as growing with the square of the
width too; with several scales (``--scale 8,4,2``) the fixed part and the per-block part are each
also fitted against the width (a constant, a linear and a square term, least squares) and
carried to full width: an estimate closer than the bound, and an extrapolation, said as such.
Time does not scale that simply (the eigendecompositions go as ``K^3``) and is not extrapolated.

    HF_HUB_OFFLINE=1 python scripts/bench_scale.py --layers 2,3 --samples 8 --seq 64
    HF_HUB_OFFLINE=1 python scripts/bench_scale.py --scale 8,4,2 --layers 2,4 --samples 8 --seq 64
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


def polyfit(xs: list[float], ys: list[float], powers: list[int]) -> list[float]:
    """Least-squares coefficients of ``ys ~ sum_p c_p x^p`` over ``powers``, as a list indexed by the
    power (0 where a power is left out)."""
    import torch

    x = torch.tensor(xs, dtype=torch.float64)[:, None]
    design = x ** torch.tensor(powers, dtype=torch.float64)  # (points, powers)
    c = torch.linalg.lstsq(design, torch.tensor(ys, dtype=torch.float64)[:, None]).solution[:, 0]
    out = [0.0] * (max(powers) + 1)
    for p, value in zip(powers, c.tolist(), strict=True):
        out[p] = value
    return out


def line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``(intercept, slope)`` of ``ys`` on ``xs``."""
    c0, c1 = polyfit(xs, ys, [0, 1])
    return c0, c1


def quadratic(xs: list[float], ys: list[float]) -> list[float]:
    """Least-squares ``c0, c1, c2`` of ``ys ~ c0 + c1 x + c2 x^2`` (exact through three points; with
    two, ``c1 = 0``: a constant and a square term)."""
    return polyfit(xs, ys, [0, 2] if len(xs) == 2 else [0, 1, 2])


def at(coefficients: list[float], x: float) -> float:
    return sum(c * x**i for i, c in enumerate(coefficients))


def measure(k: int, counts: list[int], args) -> list[tuple[int, float, float, float]]:
    """``(layers, seconds, peak GB, stacked fraction kept)`` of a conversion at each layer count, at
    ``1/k`` of the 7B widths."""
    shape = {key: value // k for key, value in LLAMA_2_7B.items()}
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
        print(f"1/{k} width, {layers} layers: {seconds:.0f} s, {peak / 1e9:.2f} GB", file=sys.stderr)
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="2,3", help="layer counts to run (at least two)")
    p.add_argument("--budget", type=float, default=0.6)
    p.add_argument("--samples", type=int, default=8, help="calibration sequences")
    p.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    p.add_argument(
        "--scale", default="1", help="divide every width by this; several (8,4,2): fit memory against width"
    )
    args = p.parse_args()
    scales = sorted({int(k) for k in args.scale.split(",")}, reverse=True)
    counts = sorted({int(n) for n in args.layers.split(",")})
    if len(counts) < 2:
        raise SystemExit("--layers needs at least two layer counts to fit a per-block cost")
    print(
        f"Llama-2-7B shape (hidden {LLAMA_2_7B['hidden_size']}, intermediate {LLAMA_2_7B['intermediate_size']}, "
        f"{LLAMA_2_7B['num_attention_heads']} heads, vocab {VOCAB}) "
        f"{'at ' + ', '.join(f'1/{k}' for k in scales) + ' width' if scales != [1] else ''}, "
        f"random bf16 weights, `--budget {args.budget}`, calibrated on {args.samples} x {args.seq} "
        "random tokens.\n"
    )
    print("| width | layers | wall | peak RSS | stacked kept |")
    print("|---|---|---|---|---|")
    fits = {}  # k -> (fixed GB, per block GB)
    for k in scales:
        runs = measure(k, counts, args)
        for layers, seconds, peak, kept in runs:
            print(f"| 1/{k} | {layers} | {seconds:.0f} s | {peak:.2f} GB | {kept:.3f} |")
        fits[k] = line([r[0] for r in runs], [r[2] for r in runs])
        if k == 1:
            t0, t1 = line([r[0] for r in runs], [r[1] for r in runs])
            full = fits[k][0] + fits[k][1] * FULL_LAYERS
            print(
                f"| 1 | {FULL_LAYERS} (extrapolated) | {(t0 + t1 * FULL_LAYERS) / 60:.0f} min | {full:.1f} GB "
                f"({'fits' if full <= MACHINE_GB else 'does not fit'} {MACHINE_GB} GB) | |"
            )
    print()
    if scales == [1]:
        return
    base = json.loads(subprocess.check_output([sys.executable, "-c", IMPORTS_ONLY], cwd=ROOT))["hwm"] / 1e9
    print(f"A process that only imports lors and transformers: {base:.2f} GB.\n")
    print("| width | fixed, above that | per block | 32 layers |")
    print("|---|---|---|---|")
    for k in scales:
        m0, m1 = fits[k]
        print(f"| 1/{k} | {m0 - base:.2f} GB | {m1 * 1000:.0f} MB | {m0 + m1 * FULL_LAYERS:.2f} GB |")
    widest = min(scales)
    m0, m1 = fits[widest]
    bound = base + widest * widest * (m0 + m1 * FULL_LAYERS - base)
    print(
        f"\nAt full width, from the widest run, base + {widest * widest} x (peak - base), an upper bound "
        f"(everything above the base counted as growing with the square of the width): "
        f"{widest * widest * m1:.2f} GB per block, {bound:.1f} GB at {FULL_LAYERS} layers "
        f"({'fits' if bound <= MACHINE_GB else 'does not fit'} {MACHINE_GB} GB)."
    )
    if len(scales) >= 2:  # distinct widths: fit each part against the width
        xs = [1 / k for k in scales]
        fixed = quadratic(xs, [fits[k][0] - base for k in scales])
        block = quadratic(xs, [fits[k][1] for k in scales])
        total = base + at(fixed, 1.0) + FULL_LAYERS * at(block, 1.0)
        terms = (
            "a constant, a linear and a square term" if len(scales) > 2 else "a constant and a square term"
        )
        measured = {k: fits[k][0] - base + FULL_LAYERS * fits[k][1] for k in scales}  # 32 layers, above base
        misfit = max(abs(at(fixed, 1 / k) + FULL_LAYERS * at(block, 1 / k) - measured[k]) for k in scales)
        print(
            f"Fitted against the width ({terms}, least squares through the {len(scales)} widths, "
            f"{misfit:.2f} GB from the runs' own 32-layer lines at the worst width): {at(fixed, 1.0):.2f} GB "
            f"fixed above the base and {at(block, 1.0) * 1000:.0f} MB per block at full width, {total:.1f} GB "
            f"at {FULL_LAYERS} layers ({'fits' if total <= MACHINE_GB else 'does not fit'} {MACHINE_GB} GB; "
            "an extrapolation, not a measurement)."
        )


if __name__ == "__main__":
    if "--scale" in sys.argv:  # a section per set of widths: the narrow runs measure memory only
        k = sys.argv[sys.argv.index("--scale") + 1]
        section = (
            f"scale-1-{k.replace(',', '-')}",
            f"Calibrated conversion of a 7B-shaped Llama at 1/{k.replace(',', ', 1/')} width: memory per block",
        )
    else:
        section = ("scale", "Calibrated conversion of a 7B-shaped Llama, per block")
    with recorded(*section):
        main()
