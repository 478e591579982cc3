"""Held-out English of kinds unlike lors's calibration and probe text, made from what any machine
with Python has (no download): technical prose (the stdlib's docstrings) and program source (the
stdlib's code lines). Seeded samples, written as text files (one sample per line)."""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

from make_docstring_corpus import sentences

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
