"""What every ``lors`` command shares: the typer app, one-line errors and exit codes, progress on
stderr, the report on stdout, and the small flag parsers.

Human output goes to stdout (tables, ``--json``), progress and warnings to stderr. Exit codes: 0 ok,
1 runtime failure, 2 usage error. Errors are one line; ``LORS_DEBUG=1`` shows the traceback of
unexpected ones.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

import typer
from typer.core import TyperGroup

from ..errors import LorsError, LorsUsageError


class _OneLineUsage(TyperGroup):
    """Click's usage errors (a missing argument, an unknown option, a value of the wrong type) as
    one ``error: ...`` line and exit code 2, like every other error of lors; not usage + hint + error.
    (Matched by class name: typer vendors its own click in some versions.)"""

    def main(self, *args, **kwargs):
        if kwargs.get("standalone_mode", True) is False:
            return super().main(*args, **kwargs)
        try:
            rv = super().main(*args, **{**kwargs, "standalone_mode": False})
        except Exception as e:  # noqa: BLE001 - re-raised unless it is click's
            kinds = {c.__name__ for c in type(e).__mro__}
            if "NoArgsIsHelpError" in kinds:  # bare `lors`: the help, as click shows it
                e.show()
                sys.exit(e.exit_code)
            if "Abort" in kinds:
                _fail("interrupted", 130)
            if "ClickException" not in kinds:
                raise
            ctx = getattr(e, "ctx", None)
            command = f" {ctx.info_name}" if ctx is not None and ctx.parent is not None else ""
            hint = f" (see lors{command} --help)" if "UsageError" in kinds else ""
            typer.echo(f"error: {' '.join(e.format_message().split())}{hint}", err=True)
            sys.exit(e.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)  # typer.Exit(code) returns its code here


app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=_OneLineUsage,
    rich_markup_mode=None,
    help="LORS (Low-Rank Residual Structure) surgery for stacked networks.",
)


def console(stderr: bool = False):
    """Reports go to stdout, progress and warnings to stderr."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # a log or pipe has no width: rich would crop the table at 80 columns
    return Console(stderr=stderr, width=None if stream.isatty() else 150)


def log_lines(quiet: bool):
    """Progress lines of long steps on stderr (None when quiet)."""
    if quiet:
        return None
    return lambda line: typer.echo(line, err=True)


def _fail(message: str, code: int) -> None:
    first = " ".join(str(message).split())
    typer.echo(f"error: {first}", err=True)
    raise typer.Exit(code)


def handle_errors(fn):
    """Turn every failure into a one-line message and an exit code; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except LorsError as e:
            _fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except MemoryError:
            _fail("out of memory", 1)
        except Exception as e:  # a bug or an unforeseen input: still one line
            if os.environ.get("LORS_DEBUG"):
                raise
            _fail(f"unexpected {type(e).__name__}: {e} (set LORS_DEBUG=1 for the traceback)", 1)

    return wrapper


PROGRESS_EVERY = 5.0  # seconds between progress lines when stderr is not a terminal


def make_progress(enabled: bool):
    """A progress wrapper for long loops on stderr: a rich bar on a terminal, else a line every few
    seconds (a log still shows a long run moving); None when output must stay quiet."""
    if not enabled:
        return None
    if not sys.stderr.isatty():
        return _progress_lines
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    def progress(items, total: int, label: str):
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console(stderr=True),
            transient=True,
        ) as bar:
            task = bar.add_task(label, total=total)
            for item in items:
                yield item
                bar.advance(task)

    return progress


def _progress_lines(items, total: int, label: str):
    start = last = time.monotonic()
    for done, item in enumerate(items):
        now = time.monotonic()
        if now - last >= PROGRESS_EVERY:
            typer.echo(f"{label}: {done}/{total} ({now - start:.0f} s)", err=True)
            last = now
        yield item


def parse_rank(text: str) -> int | None:
    if text.strip().lower() == "full":
        return None
    try:
        value = int(text)
    except ValueError:
        raise LorsUsageError(f"--rank must be a positive integer or 'full', got {text!r}") from None
    if value < 1:
        raise LorsUsageError(f"--rank must be a positive integer or 'full', got {value}")
    return value


def parse_int_list(text: str | None, option: str) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise LorsUsageError(f"{option} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise LorsUsageError(f"{option} must be positive integers, got {text!r}")
    return values


def default_output(src: Path, suffix: str) -> Path:
    name = src.name.rstrip("/") or "model"
    stem = name[: -len(src.suffix)] if src.suffix and not src.is_dir() else name
    return src.parent / f"{stem}{suffix}"


def emit_json(data) -> None:
    typer.echo(json.dumps(data, indent=1))


def show(report, json_out: bool, quiet: bool, title: str) -> None:
    """The report on stdout (a table, or JSON); its warnings on stderr."""
    from .render import render

    if json_out:
        emit_json(report.to_dict())
    elif not quiet:
        render(report, console(), title=title)
    if not quiet:
        for w in report.warnings:
            typer.echo(f"warning: {w}", err=True)
