"""The ``lors`` command line: a thin typer layer over the library, one module per group of commands
(:mod:`.convert`; :mod:`.checkpoints`: report, merge, heal) on the shared app and error handling of
:mod:`.common`."""

from __future__ import annotations

from ..threads import configure_threads
from . import (
    checkpoints,  # noqa: F401  (registers report, merge, heal)
    convert,  # noqa: F401,I001  (registers lors convert first: the order of --help)
)
from .common import app


def main() -> None:
    configure_threads()  # before a command imports torch
    app()


__all__ = ["app", "main"]
