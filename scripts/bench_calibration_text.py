"""What the calibration text costs: SmolLM2-135M converted at each budget calibrated on text the model
writes (the default for causal LMs) and on lors's shipped prose (``--calibrate`` the shipped file),
each conversion ``lors convert`` in its own process (wall time and peak RSS from ``wait4``), then every
checkpoint measured on three held-out kinds of text unlike both: lors's probe text (dialogue, reviews,
code comments, questions), technical prose (stdlib docstrings) and program source (stdlib code lines),
``scripts/heldout_kinds.py``. Reports the perplexity ratio and top-1 on each, and the worst ratio.

The baseline row is SVD-LLM's truncation computed here on the default's calibration text: every
stacked matrix alone (no shared part), ``W ~ (W L)_k L^-1`` with ``L L^T`` its input Gram on that
text, at the rank that keeps the budget's fraction of each matrix's parameters (uniform compression,
``k = floor(B d h / (d + h))``), open loop; made in its own process like the conversions, saved as a
dense model of the same function.

Checkpoints are kept in ``--work`` and reused (with the wall time and peak RSS measured when made; a
checkpoint put there by hand shows none).

    HF_HUB_OFFLINE=1 python scripts/bench_calibration_text.py --budgets 0.5,0.7,0.85
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

from bench_calibrate import run_measured  # noqa: E402
from bench_frontier import smollm2_dir  # noqa: E402
from benchdoc import table, write_section  # noqa: E402
from heldout_kinds import heldout_kinds, kind_cells  # noqa: E402

from lors_convert import checkpoint as ck  # noqa: E402
from lors_convert.calibrate.fidelity import Reference, fidelity  # noqa: E402
from lors_convert.calibrate.probes import CALIBRATION_TEXT, PROBE_TEXT, read_probes  # noqa: E402
from lors_convert.io.hf import load_tokenizer  # noqa: E402
from lors_convert.io.sources import load_source  # noqa: E402
from lors_convert.threads import configure_threads  # noqa: E402

CALIBRATIONS = {"generated (default)": [], "shipped prose": ["--calibrate", str(CALIBRATION_TEXT)]}
BASELINE = "SVD-LLM baseline"


def svd_llm(src: Path, budget: float, out: Path) -> None:
    """The baseline (module docstring) of ``src`` at ``budget``, saved to ``out`` as a dense HF model."""
    import torch

    from lors_convert.calibrate.grams import collect_grams
    from lors_convert.decompose.whiten import whitened_truncation
    from lors_convert.decompose.whitener import whitener
    from lors_convert.discover.plan import plan_conversion
    from lors_convert.measure import generated_calibration

    configure_threads()
    model, _ = load_source(src)
    data, _ = generated_calibration(model, src, None)
    grams = collect_grams(model, data.calibration, objective="layer")
    kept = dense = 0
    plan = plan_conversion(
        model, rank=None, require_savings=False
    )  # every stacked matrix, as lors finds them
    with torch.no_grad():
        for key in (key for pp in plan.params for key in pp.keys):
            weight = model.get_parameter(key)  # nn.Linear: (d, h), inputs from the right
            W = weight.double()
            d, h = W.shape
            k = int(budget * d * h / (d + h))
            [(B, A)], *_ = whitened_truncation(W[None], [whitener(grams[key].double())], [k])
            weight.copy_(B @ A)  # (d, h), rank k
            kept, dense = kept + k * (d + h), dense + d * h
    model.save_pretrained(out)
    load_tokenizer(src).save_pretrained(out)
    report = {"quality": {"stacked_fraction": kept / dense}}
    (out / "report.json").write_text(json.dumps(report))
    print(json.dumps(report))


def converted(src: Path, budget: float, name: str, flags: list[str], work: Path) -> tuple[Path, dict]:
    out = work / f"{name.split()[0]}-{budget}.lors"
    if name == BASELINE:
        out = work / f"svd-llm-{budget}"
        cmd = [sys.executable, __file__, "--svd-llm", str(budget), str(src), str(out)]
        return out, _measured(out, cmd, name, budget)
    cmd = [sys.executable, "-m", "lors_convert", "convert", str(src), "--budget", str(budget)]
    return out, _measured(out, [*cmd, *flags, "-o", str(out), "--force", "--json", "-q"], name, budget)


def _measured(out: Path, cmd: list[str], name: str, budget: float) -> dict:
    """The wall time and peak RSS ``cmd`` took to make ``out`` (run now unless measured before)."""
    measured = out.parent / f"{out.name}.measured.json"
    if (out / "report.json").is_file() and not measured.is_file():
        return {}
    if not measured.is_file():
        seconds, peak, _ = run_measured(cmd, ROOT)
        measured.write_text(json.dumps({"wall_s": seconds, "peak_gb": peak / 1e9}))
        print(f"{name} {budget}: {seconds:.0f} s, {peak / 1e9:.2f} GB", file=sys.stderr, flush=True)
    return json.loads(measured.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", default="0.5,0.7,0.85")
    p.add_argument("--work", type=Path, default=Path("/tmp/calibration-text-bench"))
    p.add_argument("--svd-llm", nargs=3, metavar=("BUDGET", "SRC", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.svd_llm:
        budget, source, out = args.svd_llm
        return svd_llm(Path(source), float(budget), Path(out))
    args.work.mkdir(parents=True, exist_ok=True)
    src = smollm2_dir(Path("/tmp/lors-smollm2"))
    runs = []
    for budget in map(float, args.budgets.split(",")):
        for name, flags in [*CALIBRATIONS.items(), (BASELINE, [])]:
            runs.append((budget, name, *converted(src, budget, name, flags, args.work)))
    configure_threads()
    teacher, _ = load_source(src)
    kinds = heldout_kinds(args.work, PROBE_TEXT)
    refs = {k: Reference(teacher, read_probes(path, src).batches, k) for k, path in kinds.items()}
    rows = []
    for budget, name, out, measured in runs:
        student = load_source(out)[0] if name == BASELINE else ck.load(out)
        got = {k: fidelity(student, ref) for k, ref in refs.items()}
        rows.append(
            [
                budget,
                name,
                f"{measured['wall_s']:.0f} s" if measured else "-",
                f"{measured['peak_gb']:.2f} GB" if measured else "-",
                *kind_cells(got),
            ]
        )
        print(rows[-1], file=sys.stderr, flush=True)
    body = (
        "SmolLM2-135M-Instruct, `lors convert --budget B` (generated: the default, 64 sequences of 128 "
        "tokens the model writes, seed 0; shipped: `--calibrate` lors's 260 lines of prose, news and "
        "instructions; SVD-LLM baseline: every stacked matrix alone, whitened SVD on the generated "
        "text's input Grams at the budget's fraction of its parameters, no shared part, open loop). "
        "Perplexity ratio to the source (next-token top-1 agreement) on each held-out kind: lors's probe "
        "text (260 lines), 200 stdlib docstring sentences, 200 stdlib code lines.\n\n"
        + table(
            [
                "budget",
                "calibration text",
                "wall",
                "peak RSS",
                "probe text",
                "technical prose",
                "program source",
                "worst ratio",
            ],
            rows,
        )
    )
    print(body)
    command = "python scripts/bench_calibration_text.py " + " ".join(sys.argv[1:])
    write_section("calibration-text", "Calibration text: generated against shipped prose", body, command)
    write_section(
        "calibration-text",
        "Calibration text: generated against shipped prose",
        body,
        command,
        doc=ROOT / "docs" / "calibration.md",
    )


if __name__ == "__main__":
    main()
