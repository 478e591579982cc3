"""Error types of lors: every failure a user can cause maps to one of these.

The CLI turns them into a one-line message and an exit code (1 runtime, 2 usage); anything else
escaping is a bug. :func:`about` names the input an error concerns where the raising code cannot
know it (the model analysis does not know which file the model came from).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class LorsError(Exception):
    """A failure caused by the input or the environment (exit code 1)."""

    exit_code = 1


class LorsUsageError(LorsError):
    """The call itself is wrong: bad option values, patterns that match nothing (exit code 2)."""

    exit_code = 2


@contextlib.contextmanager
def about(source) -> Iterator[None]:
    """Prefix ``source`` to a :class:`LorsError` raised inside that does not name it already."""
    try:
        yield
    except LorsError as e:
        if source is not None and str(source) not in str(e):
            e.args = (f"{source}: {e}",) + e.args[1:]
        raise


def short(e: BaseException) -> str:
    """An exception's message on one line, at most 160 characters."""
    text = " ".join(str(e).split())
    return text if len(text) <= 160 else text[:157] + "..."
