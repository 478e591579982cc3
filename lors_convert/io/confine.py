"""Confined reading: a file that a directory names (an index's shards, side files, a checkpoint's
own files) is read only if it lies inside that directory.

Knows nothing of LORS. A name must be a plain file name: no path separator, not ``.`` or ``..``,
not absolute, no NUL; an entry that is a symbolic link must resolve inside the directory. A model
directory from elsewhere (an archive, a download) cannot make lors read or copy ``/etc/passwd`` or
``~/.ssh/id_rsa`` into an output: such names are refused with a one-line :class:`LorsError`.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import LorsError


def is_plain_name(name) -> bool:
    """Whether ``name`` is one file name (no directory part, no way out of the directory)."""
    return (
        isinstance(name, str)
        and bool(name)
        and name not in (".", "..")
        and "\x00" not in name
        and "/" not in name
        and "\\" not in name
        and not os.path.isabs(name)
    )


def inside(directory: Path, path: Path) -> bool:
    """Whether ``path``, with every symbolic link followed, lies strictly inside ``directory``, or,
    for a Hugging Face cache snapshot (``<repo>/snapshots/<revision>``), inside its ``<repo>/blobs``:
    the cache stores every snapshot file as a link to its blob."""
    root = Path(os.path.realpath(directory))
    target = Path(os.path.realpath(path))
    roots = [root]
    if root.parent.name == "snapshots":
        roots.append(root.parent.parent / "blobs")
    return any(r in target.parents for r in roots)


def confined(directory: Path, name, what: str = "file", context: Path | str | None = None) -> Path:
    """``directory / name`` after checking that it stays inside ``directory``.

    ``what`` names the entry in the message ("shard", "side file"); ``context`` is the file that
    named it (the index), default the directory.
    """
    directory = Path(directory)
    where = context if context is not None else directory
    shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
    if not is_plain_name(name):
        raise LorsError(f"{where}: {what} {shown} names a file outside the model directory")
    path = directory / name
    try:
        escapes = path.is_symlink() and not inside(directory, path)
    except OSError as e:  # a name too long for the filesystem, a loop of links
        raise LorsError(f"{where}: {what} {shown} cannot be opened ({e.strerror or e})") from None
    if escapes:
        raise LorsError(f"{where}: {what} {shown} links to a file outside the model directory")
    return path


__all__ = ["is_plain_name", "inside", "confined"]
