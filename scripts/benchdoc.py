"""docs/benchmarks.md is written by the benchmark scripts: each owns one section, replaced whole on
every run and dated, so the page always shows each bench's latest figures and the command behind them.

    from benchdoc import recorded, write_section
    write_section("inference", "Inference speed", table_markdown, command="python scripts/bench_inference.py")
    with recorded("forward", "Forward latency"):   # what the block prints becomes the section's body
        print(table_markdown)

A section lives between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``; a new one is appended.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import platform
import re
import shlex
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
HEADER = (
    "# Benchmarks\n\n"
    "Written by the scripts in `scripts/` (each owns one section and replaces it on every run). Ratios are\n"
    "measured side by side in one run: the machines are noisy, so compare within a section, not across.\n"
)


def machine() -> str:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = f"{platform.machine()}, {cpus} CPUs, Python {platform.python_version()}"
    torch = sys.modules.get("torch")  # a bench that ran on a GPU has imported torch
    if torch is not None and torch.cuda.is_initialized():
        text += f", {torch.cuda.get_device_name()} (torch {torch.__version__})"
    return text


def write_section(name: str, title: str, body: str, command: str, doc: Path = DOC) -> Path:
    """Replace (or append) section ``name`` of ``doc`` with ``title``, the date, the machine, the
    command that produced it and ``body`` (markdown)."""
    today = datetime.date.today().isoformat()
    block = (
        f"<!-- bench:{name} -->\n## {title}\n\n"
        f"{today}, {machine()}: `{command}`\n\n{body.rstrip()}\n<!-- /bench:{name} -->\n"
    )
    text = doc.read_text() if doc.exists() else HEADER
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->\n", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    tmp = doc.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(doc)
    return doc


def table(header: list[str], rows: list[list]) -> str:
    """A markdown table; floats with 3 significant decimals."""

    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


class _Tee(io.StringIO):
    def __init__(self, stream):
        super().__init__()
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(text)
        return super().write(text)

    def flush(self) -> None:
        self.stream.flush()


@contextlib.contextmanager
def recorded(name: str, title: str, doc: Path = DOC):
    """Print as usual inside the block; on a clean exit, what was printed to stdout becomes section
    ``name`` of ``doc``, with the command line that ran the script."""
    tee = _Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        yield
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *sys.argv[1:]])
    write_section(name, title, tee.getvalue(), command, doc)
