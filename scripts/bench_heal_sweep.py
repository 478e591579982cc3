"""Heal settings side by side at equal tokens: one process, one conversion, the same generated text.

Loads the source (teacher) and a LORS checkpoint (student) once; for each variant (a JSON object of
``HealSettings`` fields) the student is reset to the checkpoint, healed for ``--tokens`` tokens on the
text the source writes (as ``lors heal`` makes it), and measured on three held-out kinds of text, none
of them heal text (lors's probe text, stdlib docstrings, stdlib code: ``scripts/heldout_kinds.py``). Prints, and writes to docs/healing.md (section
``heal-sweep``), the perplexity ratio and top-1 after each variant on each kind, its tokens/s, and the
held-out generated windows' ratio that chooses heal's best state (with ``--eval-every``, its curve).

    HF_HUB_OFFLINE=1 python scripts/bench_heal_sweep.py --checkpoint /tmp/heal-bench/smollm2-0.7.lors \\
        --tokens 16384 --variants '[{"lr": 1e-4}, {"lr": 3e-4}, {"lr": 1e-3}]'
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

from benchdoc import table, write_section  # noqa: E402
from heldout_kinds import kind_cells, kind_references  # noqa: E402

from lors_convert import checkpoint as ck  # noqa: E402
from lors_convert.calibrate.fidelity import Reference, fidelity  # noqa: E402
from lors_convert.heal.data import DataRequest, lm_data  # noqa: E402
from lors_convert.heal.settings import HealSettings  # noqa: E402
from lors_convert.heal.train import heal  # noqa: E402
from lors_convert.io.hf import load_tokenizer  # noqa: E402
from lors_convert.io.sources import load_source  # noqa: E402
from lors_convert.threads import configure_threads  # noqa: E402

DATA_FIELDS = ("batch_tokens", "seq_len")  # variant keys that change the batches, not HealSettings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="a lors convert output of a causal LM")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--generated-tokens", type=int, default=DataRequest().generated_tokens)
    p.add_argument("--variants", default='[{"lr": 1e-4}, {"lr": 3e-4}, {"lr": 1e-3}]')
    p.add_argument("--eval-every", type=int, default=0, help="held-out evaluations every N steps (the curve)")
    p.add_argument("--work", type=Path, default=Path("/tmp/heal-bench"))
    args = p.parse_args()
    configure_threads()
    args.work.mkdir(parents=True, exist_ok=True)
    source = ck.Checkpoint(args.checkpoint).source
    src = Path(source["path"])
    teacher, _ = load_source(src)
    student = ck.load(args.checkpoint)
    tokenizer = load_tokenizer(src)

    def data_for(v: dict):
        req = DataRequest(generated_tokens=args.generated_tokens, **{k: v[k] for k in DATA_FIELDS if k in v})
        return lm_data(teacher, tokenizer, req, args.work, source.get("sha256") or str(src))

    data = data_for({})
    refs = kind_references(teacher, src, args.work)
    chooser = Reference(teacher, data.heldout, "held-out generated windows")
    start = {n: t.detach().clone() for n, t in student.named_parameters()}

    def score() -> dict:
        q = fidelity(student, chooser)
        return {"score": -q["heldout_kl"], "ppl_ratio": q["heldout_ppl_ratio"]}

    rows = [["(converted)", "-", "-", f"{score()['ppl_ratio']:.3f}", *kind_cells(measured(student, refs))]]
    for v in json.loads(args.variants):
        with torch.no_grad():
            for n, t in student.named_parameters():
                t.copy_(start[n])
        settings = {k: x for k, x in v.items() if k not in DATA_FIELDS}
        base = HealSettings(loss="kl", synthetic=0.0, tokens=args.tokens, eval_every=args.eval_every)
        s = dataclasses.replace(base, **settings)
        began = time.perf_counter()
        r = heal(student, teacher, data_for(v).batches, s, evaluate=score)
        curve = " ".join(f"{e['tokens'] // 1000}k:{e['ppl_ratio']:.3f}" for e in r.evaluations)
        print(json.dumps(v), "curve", curve, flush=True)
        best = next(e["ppl_ratio"] for e in r.evaluations if e["step"] == r.best_step)
        rows.append(
            [
                json.dumps(v),
                r.tokens,
                round(r.tokens / r.seconds),
                f"{best:.3f}",
                *kind_cells(measured(student, refs)),
            ]
        )
        print(rows[-1], f"({time.perf_counter() - began:.0f} s)", flush=True)
    body = (
        f"{args.checkpoint.name}: heal variants at {args.tokens:,} tokens each on {data.tokens:,} tokens the source "
        "wrote (seed 0), each ending in its best state on the held-out generated windows; perplexity ratio "
        "(top-1) on three held-out kinds of text, none of them heal text (`scripts/heldout_kinds.py`). "
        "Variants change the defaults of `HealSettings` (loss kl, no synthetic steps) or the batches "
        "(`batch_tokens`, `seq_len`).\n\n"
        + table(
            ["variant", "tokens", "tokens/s", "held-out generated ppl ratio", *KINDS, "worst"],
            rows,
        )
    )
    print(body)
    command = "python scripts/bench_heal_sweep.py " + " ".join(sys.argv[1:])
    write_section(
        "heal-sweep", "Heal settings at equal tokens", body, command, doc=ROOT / "docs" / "healing.md"
    )


KINDS = ("probe text", "technical prose", "program source")


def measured(student, refs: dict) -> dict:
    return {k: fidelity(student, ref) for k, ref in refs.items()}


if __name__ == "__main__":
    main()
