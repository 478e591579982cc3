"""Forward latency: LORS model vs dense vs merged, measured interleaved in one run, as ratios.

A GPT-2-small-size stack (12 layers, hidden 768, random weights), sequence 128, batch 1 and 16,
LORS rank 8 and 64. Each round times dense, LORS and merged once each in turn; the medians over
rounds are compared, so machine noise hits all three alike. CPU always; CUDA too when available.

    python scripts/bench_forward.py [--rounds 15] [--threads N]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lors_convert import convert, merge  # noqa: E402


def build(device: str):
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    config = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=1024, n_positions=256)
    return GPT2Model(config).eval().to(device)


def timer(model, ids, device: str):
    def run() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            model(input_ids=ids)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    return run


def bench(device: str, rounds: int):
    """Yields one row per (rank, batch) as soon as it is measured."""
    dense = build(device)
    for rank in (8, 64):
        lors, _ = convert(copy.deepcopy(dense), rank=rank)
        merged = merge(copy.deepcopy(lors))
        for batch in (1, 16):
            ids = torch.randint(0, 1024, (batch, 128), device=device)
            runners = {"dense": timer(dense, ids, device), "lors": timer(lors, ids, device),
                       "merged": timer(merged, ids, device)}
            for run in runners.values():  # warm up
                run(), run()
            times = {name: [] for name in runners}
            for _ in range(rounds):
                for name, run in runners.items():
                    times[name].append(run())
            med = {name: statistics.median(v) for name, v in times.items()}
            yield {"device": device, "rank": rank, "batch": batch, "dense_ms": 1e3 * med["dense"],
                   "lors_over_dense": med["lors"] / med["dense"], "merged_over_dense": med["merged"] / med["dense"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print("| device | rank | batch x seq | dense ms | LORS / dense | merged / dense |")
    print("|---|---|---|---|---|---|")
    for device in devices:
        for row in bench(device, args.rounds):
            print(f"| {row['device']} | {row['rank']} | {row['batch']} x 128 | {row['dense_ms']:.1f} | "
                  f"{row['lors_over_dense']:.3f}x | {row['merged_over_dense']:.3f}x |", flush=True)


if __name__ == "__main__":
    main()
