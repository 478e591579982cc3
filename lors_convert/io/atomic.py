"""Atomic outputs: write to a hidden temporary entry beside OUT, rename it into place on success.

Knows nothing of LORS. A crash or kill leaves OUT as it was (old content or absent) plus at most a
hidden ``.<name>.tmp-<pid>@<host>.*`` entry, which the next write of OUT removes once its process is
gone (:func:`sweep_stale_temps`).
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import LorsError, LorsUsageError


def check_output(out: Path, force: bool) -> None:
    """Refuse early (before any work) when ``out`` exists and ``force`` is not given."""
    if out.exists() and not force:
        raise LorsUsageError(f"{out} already exists: pass --force to replace it")
    parent = Path(os.path.abspath(out)).parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # the nearest existing ancestor is where the temp entry gets created
    if not parent.is_dir():
        raise LorsError(f"cannot write {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LorsError(f"cannot write {out}: {parent} is not writable")


def check_not_input(out: Path, src: Path) -> None:
    """Refuse an output that would replace the input (even with --force): it may be the only copy."""
    o, i = Path(os.path.abspath(out)), Path(os.path.abspath(src))
    if o == i or o in i.parents or i in o.parents:  # the input, a directory holding it, or a file in it
        raise LorsUsageError(f"output {out} would replace the input {src} or a file in it: "
                             "choose another output path")


@contextlib.contextmanager
def atomic_output(out: Path, force: bool = False, directory: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``out``; rename it onto ``out`` only if the block succeeds.

    A crash or kill leaves ``out`` as it was (old content or absent) plus at most a hidden
    ``.<name>.tmp-<pid>@<host>.*`` entry, never a half-written ``out``; the next write of ``out``
    removes such entries whose process is gone (see :func:`sweep_stale_temps`).
    """
    out = Path(out)
    check_output(out, force)
    parent = out.parent if str(out.parent) else Path(".")
    prefix = f"{_temp_prefix(out.name)}{os.getpid()}@{socket.gethostname()}."
    try:
        parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_temps(parent, out.name)
        if directory:
            tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, dir=parent)
            os.close(fd)
            tmp = Path(name)
    except OSError as e:
        raise LorsError(f"cannot write {out}: {e.strerror or e}") from None
    try:
        yield tmp
        _normal_permissions(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as e:
        _remove(tmp)
        raise LorsError(f"cannot write {out}: {e.strerror or e}") from None
    except BaseException:
        _remove(tmp)
        raise


def _temp_prefix(name: str) -> str:
    return f".{name}.tmp-"


def sweep_stale_temps(parent: Path, name: str) -> list[Path]:
    """Remove ``.<name>.tmp-<pid>@<host>.*`` entries left in ``parent`` by killed runs; return them.

    Only entries of this host whose process no longer exists: a live run's, another machine's (a
    shared filesystem) or an unparsable name is left alone. ``.old-*`` entries (the previous output
    during the two-rename swap) are never touched.
    """
    host = socket.gethostname()
    removed = []
    for entry in parent.glob(f"{glob.escape(_temp_prefix(name))}*"):
        owner = entry.name[len(_temp_prefix(name)):]
        pid, at, rest = owner.partition("@")
        entry_host, dot, _ = rest.rpartition(".")
        if not (at and dot and pid.isdigit() and entry_host == host) or _process_alive(int(pid)):
            continue
        _remove(entry)
        removed.append(entry)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, owned by someone else
        return True
    return True


def _normal_permissions(path: Path) -> None:
    """mkdtemp/mkstemp create private (0700/0600) entries: give the result the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    entries = [path] + (list(path.rglob("*")) if path.is_dir() else [])
    for entry in entries:
        os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~umask)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()
