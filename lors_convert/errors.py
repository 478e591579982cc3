"""Error types of lors: every failure a user can cause maps to one of these.

The CLI turns them into a one-line message and an exit code (1 runtime, 2 usage);
anything else escaping is a bug.
"""
from __future__ import annotations


class LorsError(Exception):
    """A failure caused by the input or the environment (exit code 1)."""

    exit_code = 1


class LorsUsageError(LorsError):
    """The call itself is wrong: bad option values, patterns that match nothing (exit code 2)."""

    exit_code = 2
