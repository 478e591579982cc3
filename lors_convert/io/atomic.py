"""Atomic outputs: write to a hidden temporary entry beside OUT, swap it into place on success.

Knows nothing of LORS. A crash or kill leaves OUT complete (the previous output or the new one)
plus at most hidden entries beside it, which the next lors command touching OUT cleans up:

- ``.<name>.tmp-<pid>@<host>.*``: a temporary output (being written, or the previous output just
  swapped out); removed once its process is gone (:func:`sweep_stale_temps`).
- Replacing an existing OUT (``--force``) swaps the two entries in one step on Linux
  (``renameat2(RENAME_EXCHANGE)``, :func:`exchange`), files and directories alike. Where that is
  not available (another OS, a filesystem without it) it takes two renames, OUT to
  ``.<name>.old-<pid>@<host>.*/<name>`` and the temporary onto OUT; a kill between them leaves OUT
  absent, and :func:`recover_output` (run by every writer and reader of OUT) puts the previous
  output back once that process is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import glob
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import LorsError, LorsUsageError


def check_output(out: Path, force: bool) -> None:
    """Refuse early (before any work) when ``out`` exists and ``force`` is not given (an output
    orphaned by a killed replacement is restored first, :func:`recover_output`)."""
    recover_output(out)
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
        raise LorsUsageError(
            f"output {out} would replace the input {src} or a file in it: choose another output path"
        )


@contextlib.contextmanager
def atomic_output(out: Path, force: bool = False, directory: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``out``; swap it onto ``out`` only if the block succeeds.

    A crash or kill leaves ``out`` complete (old or new content) plus at most hidden entries beside
    it, never a half-written ``out``; see the module docstring for the one window (no
    ``renameat2``) where ``out`` is absent until the next command restores it.
    """
    out = Path(out)
    check_output(out, force)
    parent = out.parent if str(out.parent) else Path(".")
    prefix = _temp_prefix(out.name) + owner_tag()
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
        if not os.path.lexists(out):
            _rename(tmp, out)
        elif exchange(tmp, out):  # one step: OUT is the new output, tmp the previous one
            _remove(tmp)
        else:
            _replace_in_two_steps(tmp, out, parent)
    except OSError as e:
        _remove(tmp)
        raise LorsError(f"cannot write {out}: {e.strerror or e}") from None
    except BaseException:
        _remove(tmp)
        raise


def _temp_prefix(name: str) -> str:
    return f".{name}.tmp-"


def _old_prefix(name: str) -> str:
    return f".{name}.old-"


def owner_tag() -> str:
    """``<pid>@<host>.``: what a temporary entry's name carries after its prefix, so that a later run
    can tell whether its owner is gone (:func:`sweep_dead_owners`)."""
    return f"{os.getpid()}@{socket.gethostname()}."


def _rename(src: Path, dst: Path) -> None:
    os.replace(src, dst)


RENAME_EXCHANGE = 2  # linux/fs.h
AT_FDCWD = -100


@functools.lru_cache(maxsize=1)
def _renameat2():
    """glibc's ``renameat2``, or None (not Linux, an old C library)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing entries (files or directories, of either kind) in one atomic step.

    True when done; False where ``renameat2(RENAME_EXCHANGE)`` is not available (not Linux, or a
    filesystem that does not support it): the caller falls back to two renames.
    """
    fn = _renameat2()
    if fn is None:
        return False
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replace_in_two_steps(tmp: Path, out: Path, parent: Path) -> None:
    """OUT into a hidden ``.old-<pid>@<host>`` directory, then the new output onto OUT: a kill in
    between leaves OUT absent until :func:`recover_output` restores it."""
    old = Path(tempfile.mkdtemp(prefix=_old_prefix(out.name) + owner_tag(), dir=parent))
    _rename(out, old / out.name)
    try:
        _rename(tmp, out)
    except OSError:
        _rename(old / out.name, out)  # put the previous output back before reporting the failure
        _remove(old)
        raise
    _remove(old)


def _dead_owner(entry_name: str, prefix: str) -> bool | None:
    """Whether the process named in ``<prefix><pid>@<host>.<random>`` is gone: True, False (alive,
    or another host's), None (no owner in the name: an entry of an older lors)."""
    pid, at, rest = entry_name[len(prefix) :].partition("@")
    entry_host, dot, _ = rest.rpartition(".")
    if not (at and dot and pid.isdigit()):
        return None
    return entry_host == socket.gethostname() and not _process_alive(int(pid))


def recover_output(out: Path) -> Path | None:
    """Undo what a killed two-rename replacement of ``out`` left: restore the previous output when
    ``out`` is absent, and remove the hidden ``.old-*`` directories of processes that are gone.

    Returns the restored path or None. Entries of live processes and of other hosts are left
    alone; an entry without an owner (older lors) is only used to restore a missing ``out``.
    Best effort: a directory that cannot be changed is left as it is.
    """
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    prefix = _old_prefix(out.name)
    restored = None
    try:
        entries = sorted(parent.glob(f"{glob.escape(prefix)}*"))
    except OSError:
        return None
    for entry in entries:
        dead = _dead_owner(entry.name, prefix)
        if dead is False:
            continue
        saved = entry / out.name
        with contextlib.suppress(OSError):
            if not os.path.lexists(out) and os.path.lexists(saved):
                os.replace(saved, out)
                restored = out
            if dead:
                _remove(entry)
    return restored


def sweep_stale_temps(parent: Path, name: str) -> list[Path]:
    """Remove ``.<name>.tmp-<pid>@<host>.*`` entries left in ``parent`` by killed runs; return them.
    ``.old-*`` entries (the previous output during the two-rename swap) are :func:`recover_output`'s."""
    return sweep_dead_owners(parent, _temp_prefix(name))


def sweep_dead_owners(parent: Path, prefix: str) -> list[Path]:
    """Remove the ``<prefix><pid>@<host>.*`` entries of ``parent`` (names made with
    :func:`owner_tag`) whose process is gone; return them.

    Only entries of this host whose process no longer exists: a live run's, another machine's (a
    shared filesystem) or an unparsable name is left alone.
    """
    removed = []
    for entry in parent.glob(f"{glob.escape(prefix)}*"):
        if _dead_owner(entry.name, prefix):
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
