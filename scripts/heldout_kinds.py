"""Held-out English of kinds unlike lors's calibration and probe text, made from what any machine
with Python has (no download): technical prose (the stdlib's docstrings) and program source (the
stdlib's code lines). Seeded samples, written as text files (one sample per line).

``python scripts/heldout_kinds.py SRC CKPT...`` measures each LORS checkpoint of ``SRC`` on the three
kinds: perplexity ratio and top-1 on each, and the worst ratio."""

from __future__ import annotations

import argparse
import random
import sys
import sysconfig
from pathlib import Path

from make_docstring_corpus import sentences

ROOT = Path(__file__).resolve().parents[1]

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def technical_text(work: Path, n: int = 200) -> Path:
    """``n`` stdlib docstring sentences of 60-400 characters."""
    lines = [s for s in sentences(STDLIB) if 60 < len(s) < 400]
    random.Random(1).shuffle(lines)
    path = work / "technical.txt"
    path.write_text("\n".join(lines[:n]) + "\n")
    return path


def code_text(work: Path, n: int = 200) -> Path:
    """``n`` lines of the stdlib's top-level modules' code (41-199 characters, no comments or strings)."""
    lines = []
    for module in sorted(STDLIB.glob("*.py")):
        for line in module.read_text(errors="ignore").splitlines():
            s = line.strip()
            if 40 < len(s) < 200 and not s.startswith(("#", '"', "'")):
                lines.append(s)
    random.Random(2).shuffle(lines)
    path = work / "code.txt"
    path.write_text("\n".join(lines[:n]) + "\n")
    return path


def heldout_kinds(work: Path, probe: Path) -> dict[str, Path]:
    """The bench's held-out kinds: lors's probe text, technical prose and program source."""
    work.mkdir(parents=True, exist_ok=True)
    return {"probe": probe, "technical": technical_text(work), "code": code_text(work)}


def kind_figures(
    source: Path, checkpoints: list[Path], work: Path, device: str = "cpu"
) -> dict[Path, dict[str, dict]]:
    """``{checkpoint: {kind: fidelity}}`` of each LORS checkpoint of ``source`` on the three kinds, the
    models run on ``device``."""
    sys.path.insert(0, str(ROOT))
    from lors_convert import checkpoint as ck
    from lors_convert.calibrate.fidelity import fidelity
    from lors_convert.io.sources import load_source

    teacher, _ = load_source(source)
    teacher.to(device)
    refs = kind_references(teacher, source, work)
    return {c: {k: fidelity(ck.load(c).to(device), ref) for k, ref in refs.items()} for c in checkpoints}


def kind_references(teacher, source: Path, work: Path) -> dict:
    """``{kind: Reference}`` of ``teacher`` (tokenized as ``source``) on the bench's three held-out kinds."""
    sys.path.insert(0, str(ROOT))
    from lors_convert.calibrate.fidelity import Reference
    from lors_convert.calibrate.probes import PROBE_TEXT, read_probes

    kinds = heldout_kinds(work, PROBE_TEXT)
    return {k: Reference(teacher, read_probes(path, source).batches, k) for k, path in kinds.items()}


def kind_cells(got: dict[str, dict]) -> list[str]:
    """``ratio (top-1)`` per kind, then the worst ratio."""
    cells = [f"{q['heldout_ppl_ratio']:.2f} ({q['heldout_top1']:.3f})" for q in got.values()]
    return [*cells, f"{max(q['heldout_ppl_ratio'] for q in got.values()):.2f}"]


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path)
    p.add_argument("checkpoints", type=Path, nargs="+")
    p.add_argument("--work", type=Path, default=Path("/tmp/heldout-kinds"))
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from lors_convert.threads import configure_threads

    configure_threads()
    for ckpt, got in kind_figures(args.source, args.checkpoints, args.work).items():
        print(ckpt, " | ".join(["probe / technical / code:", *kind_cells(got)]), flush=True)
