"""Healing as a user runs it: ``lors convert SRC --budget B`` once, then ``lors heal CKPT --minutes N``.

Each command runs in its own process (wall time and peak RSS from ``wait4``); the checkpoint of each
budget is kept in ``--work`` and reused. Prints, and writes to docs/benchmarks.md (section
``heal-<model>-<budget>``) and docs/healing.md (the curve: tokens trained on -> held-out perplexity
ratio on text the source wrote with another seed), the fidelity before and after healing on the
shipped probe text (never heal data), tokens, minutes and peak RSS; for SmolLM2 also the perplexity
ratio before and after on technical prose and program source (``scripts/heldout_kinds.py``). ``--compare-precision T`` first
heals for ``T`` tokens in fp32 and in bf16, side by side: tokens/s, held-out score after the same
tokens, peak RSS.

    HF_HUB_OFFLINE=1 python scripts/bench_heal.py --model smollm2 --budget 0.7 --minutes 30
    HF_HUB_OFFLINE=1 python scripts/bench_heal.py --model minilm --budget 0.5 --minutes 10
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_calibrate import run_measured  # noqa: E402
from bench_frontier import minilm_dir, smollm2_dir  # noqa: E402
from benchdoc import table, write_section  # noqa: E402
from heldout_kinds import kind_cells, kind_figures  # noqa: E402

KEYS = ("ppl_ratio", "kl", "top1", "cosine", "rel_error")


def lors(*args) -> list[str]:
    return [sys.executable, "-m", "lors_convert", *map(str, args)]


def checkpoint(
    src: Path, budget: float, work: Path, name: str, given: Path | None, device: str = "cpu"
) -> tuple[Path, dict]:
    out = given or work / f"{name}-{budget}.lors"
    if not (out / "report.json").is_file():
        seconds, peak, _ = run_measured(
            lors("convert", src, "--budget", budget, "--device", device, "-o", out, "--json", "-q"), ROOT
        )
        print(f"converted in {seconds:.0f} s at {peak / 1e9:.2f} GB peak RSS", file=sys.stderr)
    return out, json.loads((out / "report.json").read_text())


def heal(ckpt: Path, out: Path, *flags) -> dict:
    seconds, peak, report = run_measured(
        lors("heal", ckpt, "-o", out, "--force", "--json", "-q", *flags), ROOT
    )
    q = report["quality"]
    return {"wall_s": seconds, "peak_gb": peak / 1e9, "q": q}


def figures(q: dict, prefix: str) -> dict:
    return {k: q.get(f"{prefix}heldout_{k}") for k in KEYS if q.get(f"{prefix}heldout_{k}") is not None}


def model_gb(src: Path) -> float:
    return sum(p.stat().st_size for p in src.glob("*.safetensors")) / 1e9


def precision_rows(ckpt: Path, work: Path, tokens: int, flags: list[str]) -> list[list]:
    rows = []
    for precision in ("fp32", "bf16"):
        r = heal(
            ckpt, work / f"precision-{precision}.lors", "--tokens", tokens, "--precision", precision, *flags
        )
        q, last = r["q"], r["q"]["heal_evaluations"][-1]
        rate = q["heal_tokens"] / q["heal_seconds"]
        rows.append([precision, q["heal_tokens"], rate, last["score"], r["peak_gb"]])
        print(f"{precision}: {rate:.1f} tokens/s, held-out score {last['score']:.4f}", file=sys.stderr)
    return rows


def curve(q: dict) -> str:
    key = "ppl_ratio" if any("ppl_ratio" in e for e in q["heal_evaluations"]) else "cosine"
    rows = [[e["tokens"], round(e["seconds"] / 60, 1), e.get(key), e["score"]] for e in q["heal_evaluations"]]
    what = (
        "ppl ratio (generated windows never trained on)" if key == "ppl_ratio" else "cosine (held-out data)"
    )
    return table(["tokens", "minutes", f"held-out {what}", "score"], rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("smollm2", "minilm"), default="smollm2")
    p.add_argument("--budget", type=float, default=0.7)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--work", type=Path, default=Path("/tmp/heal-bench"))
    p.add_argument("--checkpoint", type=Path, default=None, help="an existing conversion at --budget")
    p.add_argument("--compare-precision", type=int, default=0, metavar="TOKENS")
    p.add_argument("--heal-args", default="", help="more lors heal flags, e.g. '--lr 3e-4'")
    p.add_argument("--device", default="cpu", help="where conversion, healing and measurement run")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    src = (smollm2_dir if args.model == "smollm2" else minilm_dir)(Path("/tmp/lors-smollm2"))
    ckpt, converted = checkpoint(src, args.budget, args.work, args.model, args.checkpoint, args.device)
    flags = [*args.heal_args.split(), "--device", args.device]
    prec = precision_rows(ckpt, args.work, args.compare_precision, flags) if args.compare_precision else []
    healed = args.work / f"{args.model}-{args.budget}.healed.lors"
    r = heal(ckpt, healed, "--minutes", args.minutes, *flags)
    q = r["q"]
    before, after = figures(q, "before_heal_"), figures(q, "")
    rows = [[k, before.get(k), after.get(k)] for k in KEYS if k in after]
    size = model_gb(src)
    lines = [
        f"{args.model} at --budget {args.budget} (stacked fraction {converted['quality'].get('stacked_fraction')}),"
        f" healed {q['heal_seconds'] / 60:.1f} min of training ({r['wall_s'] / 60:.1f} min wall with"
        f" the before/after measurement) on {q['heal_tokens']:,} tokens ({q['heal_steps']} steps,"
        f" {q['heal_local_steps']} block-local), {q['heal_tokens'] / q['heal_seconds']:.1f} tokens/s;"
        f" peak RSS {r['peak_gb']:.2f} GB = {r['peak_gb'] / size:.1f}x the source's {size:.2f} GB of weights.",
        f"Data: {'; '.join(q['heal_data'])}. Fidelity on {q.get('heldout_probe')}:",
        "",
        table(["metric", "before heal", "after heal"], rows),
    ]
    if args.model == "smollm2":
        kinds = kind_figures(src, [ckpt, healed], args.work / "kinds", args.device)
        lines += [
            "",
            "Perplexity ratio (top-1) on three held-out kinds of text, none of them heal data:",
            "",
            table(
                ["checkpoint", "probe text", "technical prose", "program source", "worst ratio"],
                [["converted", *kind_cells(kinds[ckpt])], ["healed", *kind_cells(kinds[healed])]],
            ),
        ]
    if prec:
        lines += ["", table(["precision", "tokens", "tokens/s", "held-out score after", "peak RSS GB"], prec)]
    body = "\n".join(lines)
    print(body)
    command = "python scripts/bench_heal.py " + " ".join(sys.argv[1:])
    name = f"heal-{args.model}-{args.budget}" + ("" if args.device == "cpu" else f"-{args.device}")
    write_section(name, f"lors heal: {args.model}, budget {args.budget}", body, command)
    write_section(
        name,
        f"Curve: {args.model}, budget {args.budget}",
        body + "\n\n" + curve(q),
        command,
        doc=ROOT / "docs" / "healing.md",
    )


if __name__ == "__main__":
    main()
