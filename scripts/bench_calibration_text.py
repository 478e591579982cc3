"""What the calibration text costs: SmolLM2-135M converted at each budget calibrated on text the model
writes (the default for causal LMs) and on lors's shipped prose (``--calibrate`` the shipped file),
each conversion ``lors convert`` in its own process (wall time and peak RSS from ``wait4``), then every
checkpoint measured on three held-out kinds of text unlike both: lors's probe text (dialogue, reviews,
code comments, questions), technical prose (stdlib docstrings) and program source (stdlib code lines),
``scripts/heldout_kinds.py``. Reports the perplexity ratio and top-1 on each, and the worst ratio.

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
from lors_convert.io.sources import load_source  # noqa: E402
from lors_convert.threads import configure_threads  # noqa: E402

CALIBRATIONS = {"generated (default)": [], "shipped prose": ["--calibrate", str(CALIBRATION_TEXT)]}


def converted(src: Path, budget: float, name: str, flags: list[str], work: Path) -> tuple[Path, dict]:
    out = work / f"{name.split()[0]}-{budget}.lors"
    measured = out.with_suffix(".measured.json")
    if (out / "report.json").is_file() and not measured.is_file():
        return out, {}
    if not measured.is_file():
        cmd = [sys.executable, "-m", "lors_convert", "convert", str(src), "--budget", str(budget)]
        seconds, peak, _ = run_measured([*cmd, *flags, "-o", str(out), "--force", "--json", "-q"], ROOT)
        measured.write_text(json.dumps({"wall_s": seconds, "peak_gb": peak / 1e9}))
        print(f"{name} {budget}: {seconds:.0f} s, {peak / 1e9:.2f} GB", file=sys.stderr, flush=True)
    return out, json.loads(measured.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", default="0.5,0.7,0.85")
    p.add_argument("--work", type=Path, default=Path("/tmp/calibration-text-bench"))
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    src = smollm2_dir(Path("/tmp/lors-smollm2"))
    runs = []
    for budget in map(float, args.budgets.split(",")):
        for name, flags in CALIBRATIONS.items():
            runs.append((budget, name, *converted(src, budget, name, flags, args.work)))
    configure_threads()
    teacher, _ = load_source(src)
    kinds = heldout_kinds(args.work, PROBE_TEXT)
    refs = {k: Reference(teacher, read_probes(path, src).batches, k) for k, path in kinds.items()}
    rows = []
    for budget, name, out, measured in runs:
        student = ck.load(out)
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
        "instructions). Perplexity ratio to the source (next-token top-1 agreement) on each held-out "
        "kind: lors's probe text (260 lines), 200 stdlib docstring sentences, 200 stdlib code lines.\n\n"
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
