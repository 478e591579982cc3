"""Extra calibration text: English sentences from the docstrings of the installed Python stdlib.

Technical prose, of another kind than both scripts/data/calib_prose.txt and the held-out dialogue;
thousands of sentences without a download. The result depends on the Python version (3.11.7 gave
9,345 sentences).

    python scripts/make_docstring_corpus.py /tmp/stdlib_doc.txt
    HF_HUB_OFFLINE=1 python scripts/bench_quality.py --budgets 0.45 --extra-calib /tmp/stdlib_doc.txt --extra-n 3000
"""

from __future__ import annotations

import ast
import re
import sys
import sysconfig
from pathlib import Path

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences(root: Path) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for path in sorted(root.rglob("*.py")):
        if {"test", "idlelib", "site-packages"} & set(path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            for para in re.split(r"\n\s*\n", doc or ""):
                for s in SENTENCE_END.split(" ".join(para.split())):
                    words = s.split()
                    letters = sum(c.isalpha() or c == " " for c in s)
                    if (
                        8 <= len(words) <= 40
                        and s[0].isupper()
                        and s.endswith(".")
                        and letters / len(s) > 0.9
                        and s not in seen
                    ):
                        seen.add(s)
                        out.append(s)
    return out


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: make_docstring_corpus.py OUT.txt")
    found = sentences(Path(sysconfig.get_paths()["stdlib"]))
    Path(sys.argv[1]).write_text("\n".join(found) + "\n", encoding="utf-8")
    print(f"{len(found)} sentences -> {sys.argv[1]}", file=sys.stderr)


if __name__ == "__main__":
    main()
