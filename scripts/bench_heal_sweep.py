"""Heal settings side by side at equal tokens: one process, one conversion, the same generated text.

Loads the source (teacher) and a LORS checkpoint (student) once; for each variant (a JSON object of
``HealSettings`` fields) the student is reset to the checkpoint, healed for ``--tokens`` tokens on the
text the source writes (as ``lors heal`` makes it), and measured on technical English of another kind
than both the heal text and lors's probe text: sentences from the installed Python stdlib's docstrings
(``scripts/make_docstring_corpus.py``, seeded sample). Prints, and writes to docs/healing.md (section
``heal-sweep``), the perplexity ratio, KL and top-1 after each variant, its tokens/s, and the held-out
generated windows' ratio that chooses heal's best state.

    HF_HUB_OFFLINE=1 python scripts/bench_heal_sweep.py --checkpoint /tmp/heal-bench/smollm2-0.7.lors \\
        --tokens 16384 --variants '[{"lr": 1e-4}, {"lr": 3e-4}, {"lr": 1e-3}]'
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

from benchdoc import table, write_section  # noqa: E402
from heldout_kinds import technical_text  # noqa: E402

from lors_convert import checkpoint as ck  # noqa: E402
from lors_convert.calibrate.fidelity import Reference, fidelity  # noqa: E402
from lors_convert.calibrate.probes import read_probes  # noqa: E402
from lors_convert.heal.data import DataRequest, lm_data  # noqa: E402
from lors_convert.heal.settings import HealSettings  # noqa: E402
from lors_convert.heal.train import heal  # noqa: E402
from lors_convert.io.hf import load_tokenizer  # noqa: E402
from lors_convert.io.sources import load_source  # noqa: E402
from lors_convert.threads import configure_threads  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="a lors convert output of a causal LM")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--generated-tokens", type=int, default=16384)
    p.add_argument("--variants", default='[{"lr": 1e-4}, {"lr": 3e-4}, {"lr": 1e-3}]')
    p.add_argument("--work", type=Path, default=Path("/tmp/heal-bench"))
    args = p.parse_args()
    configure_threads()
    args.work.mkdir(parents=True, exist_ok=True)
    src = Path(ck.Checkpoint(args.checkpoint).source["path"])
    teacher, _ = load_source(src)
    student = ck.load(args.checkpoint)
    req = DataRequest(generated_tokens=args.generated_tokens)
    data = lm_data(teacher, load_tokenizer(src), req, args.work, str(src))
    tech = Reference(teacher, read_probes(technical_text(args.work), src).batches, "technical")
    chooser = Reference(teacher, data.heldout, "held-out generated windows")
    start = {n: t.detach().clone() for n, t in student.named_parameters()}

    def score() -> dict:
        q = fidelity(student, chooser)
        return {"score": -q["heldout_kl"], "ppl_ratio": q["heldout_ppl_ratio"]}

    q0 = fidelity(student, tech)
    rows = [["(converted)", "-", "-", "-", q0["heldout_ppl_ratio"], q0["heldout_kl"], q0["heldout_top1"]]]
    for v in json.loads(args.variants):
        with torch.no_grad():
            for n, t in student.named_parameters():
                t.copy_(start[n])
        s = HealSettings(**{"loss": "kl", "synthetic": 0.0, "tokens": args.tokens, **v})
        began = time.perf_counter()
        r = heal(student, teacher, data.batches, s, evaluate=score)
        q = fidelity(student, tech)
        rate = r.tokens / r.seconds
        gen = r.evaluations[-1]["ppl_ratio"]
        rows.append(
            [
                json.dumps(v),
                r.tokens,
                round(rate),
                gen,
                *(q[f"heldout_{k}"] for k in ("ppl_ratio", "kl", "top1")),
            ]
        )
        print(rows[-1], f"({time.perf_counter() - began:.0f} s)", flush=True)
    body = (
        f"{args.checkpoint.name}: heal variants at {args.tokens:,} tokens each on {data.tokens:,} tokens the source "
        "wrote (seed 0), measured on 200 stdlib docstring sentences (technical English, never heal or "
        "calibration text). Variants change the defaults of `HealSettings` (loss kl, no synthetic steps).\n\n"
        + table(
            [
                "variant",
                "tokens",
                "tokens/s",
                "held-out generated ppl ratio",
                "technical ppl ratio",
                "KL",
                "top-1",
            ],
            rows,
        )
    )
    print(body)
    command = "python scripts/bench_heal_sweep.py " + " ".join(sys.argv[1:])
    write_section(
        "heal-sweep", "Heal settings at equal tokens", body, command, doc=ROOT / "docs" / "healing.md"
    )


if __name__ == "__main__":
    main()
