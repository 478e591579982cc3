"""Forward latency: LORS model vs dense vs merged, measured interleaved in one run, as ratios.

A GPT-2-small-size stack (12 layers, hidden 768, random weights), sequence 128, batch 1 and 16,
LORS rank 8 and 64. Each round times dense, LORS, LORS with the previous (unfused) forward and
merged once each in turn, starting with the next one each round; the medians over rounds are
compared, so machine noise hits all alike.
CPU always; CUDA too when available.

    python scripts/bench_forward.py [--rounds 15] [--threads N] [--ranks 8]
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

from benchdoc import recorded  # noqa: E402

from lors_convert import convert, merge  # noqa: E402


def build(device: str):
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    config = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=1024, n_positions=256)
    return GPT2Model(config).eval().to(device)


def unfused(lors):
    """A copy of ``lors`` whose layers run the previous forward: ``y = x W_s^T + b``, then a separate
    ``+ (x A^T) B^T`` (a temporary product and an addition pass)."""
    from lors_convert.layers import LorsConv1D, LorsLinear

    def conv1d(self, x):
        rows = x.reshape(-1, x.shape[-1])
        y = torch.addmm(self.bias, rows, self.shared)
        y = y + (rows @ self.lors_B) @ self.lors_A
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def linear(self, x):
        y = torch.nn.functional.linear(x, self.shared, self.bias)
        return y + torch.nn.functional.linear(torch.nn.functional.linear(x, self.lors_A), self.lors_B)

    model = copy.deepcopy(lors)
    for m in model.modules():
        if isinstance(m, (LorsConv1D, LorsLinear)) and m.shared is not None:
            m.forward = (conv1d if isinstance(m, LorsConv1D) else linear).__get__(m)
    return model


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


def bench(device: str, rounds: int, ranks=(8, 64)):
    """Yields one row per (rank, batch) as soon as it is measured."""
    dense = build(device)
    for rank in ranks:
        lors, _ = convert(copy.deepcopy(dense), rank=rank)
        before = unfused(lors)
        merged = merge(copy.deepcopy(lors))
        for batch in (1, 16):
            ids = torch.randint(0, 1024, (batch, 128), device=device)
            runners = {
                "dense": timer(dense, ids, device),
                "lors": timer(lors, ids, device),
                "unfused": timer(before, ids, device),
                "merged": timer(merged, ids, device),
            }
            for run in runners.values():  # warm up
                run(), run()
            times = {name: [] for name in runners}
            names = list(runners)
            for r in range(rounds):  # each round starts with the next model: no position bias
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    times[name].append(runners[name]())
            med = {name: statistics.median(v) for name, v in times.items()}
            yield {
                "device": device,
                "rank": rank,
                "batch": batch,
                "dense_ms": 1e3 * med["dense"],
                "lors_over_dense": med["lors"] / med["dense"],
                "unfused_over_dense": med["unfused"] / med["dense"],
                "merged_over_dense": med["merged"] / med["dense"],
            }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--ranks", default="8,64")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(
        "| device | rank | batch x seq | dense ms | LORS / dense | previous LORS forward / dense | merged / dense |"
    )
    print("|---|---|---|---|---|---|---|")
    for device in devices:
        for row in bench(device, args.rounds, [int(r) for r in args.ranks.split(",")]):
            print(
                f"| {row['device']} | {row['rank']} | {row['batch']} x 128 | {row['dense_ms']:.1f} | "
                f"{row['lors_over_dense']:.3f}x | {row['unfused_over_dense']:.3f}x | "
                f"{row['merged_over_dense']:.3f}x |",
                flush=True,
            )


if __name__ == "__main__":
    with recorded("forward", "Forward latency: dense, LORS, merged"):
        main()
