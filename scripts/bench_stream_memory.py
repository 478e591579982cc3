"""Peak memory of streamed ``lors convert`` and ``lors merge`` against the largest stacked group.

Builds a GPT-2-medium-sized checkpoint (24 layers, n_embd 1024, random weights, safetensors, default
2 GB shards) and runs, each in its own process with default options (plus ``--no-fidelity``: the
fidelity check runs the whole model, see the README), the conversion and the merge of this tree
and, side by side, of another tree given with ``--baseline`` (e.g. a worktree of an older commit).
Peak RSS is reported above the import baseline of the same tree (a process importing what the
command imports), as a multiple of the largest stacked group (N layers x one matrix, float32).

    python scripts/bench_stream_memory.py [--baseline /path/to/older/checkout] [--layers 24 --embd 1024]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchdoc import recorded  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IMPORTS = (
    "import torch, transformers, safetensors, huggingface_hub, accelerate\n"
    "from transformers import GPT2LMHeadModel\n"
    "import lors_convert, lors_convert.cli\n"
)


def peak(cmd: list[str], tree: Path) -> int:
    """Peak RSS (bytes) of one child process run with ``tree`` first on the path."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()[-500:]}")
    return usage.ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", default=None, help="another checkout to measure side by side")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--embd", type=int, default=1024)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lors-mem-"))
    src = work / "gpt2"
    # in a child: this process must stay small, a fork's peak RSS counts the parent's pages
    make = (
        f"from transformers import GPT2Config, GPT2LMHeadModel\n"
        f"config = GPT2Config(n_layer={args.layers}, n_embd={args.embd}, n_head=16, vocab_size=50257, "
        f"n_positions=1024)\nGPT2LMHeadModel(config).save_pretrained({str(src)!r})\n"
    )
    subprocess.run([sys.executable, "-c", make], check=True, capture_output=True)
    group = args.layers * args.embd * 4 * args.embd * 4  # the MLP matrices: (d, 4d) float32 per layer
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    print(f"source {size / 1e9:.2f} GB, largest stacked group {group / 1e6:.0f} MB\n")
    print("| tree | import baseline | convert above baseline | merge above baseline |")
    print("|---|---|---|---|")
    trees = [("this", ROOT)] + ([("baseline", Path(args.baseline))] if args.baseline else [])
    for name, tree in trees:
        base = peak([sys.executable, "-c", IMPORTS], tree)
        out = work / f"{name}.lors"
        conv = peak(
            [
                sys.executable,
                "-m",
                "lors_convert",
                "convert",
                str(src),
                "--rank",
                "32",
                "-o",
                str(out),
                "-q",
                "--no-fidelity",
            ],
            tree,
        )
        merged = peak(
            [
                sys.executable,
                "-m",
                "lors_convert",
                "merge",
                str(out),
                "-o",
                str(work / f"{name}.dense"),
                "-q",
            ],
            tree,
        )
        print(
            f"| {name} | {base / 1e6:.0f} MB | {(conv - base) / 1e6:.0f} MB = {(conv - base) / group:.2f}x group "
            f"| {(merged - base) / 1e6:.0f} MB = {(merged - base) / group:.2f}x group |",
            flush=True,
        )


if __name__ == "__main__":
    with recorded("stream_memory", "Streamed conversion and merge: peak memory"):
        main()
