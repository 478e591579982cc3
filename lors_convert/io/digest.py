"""A source's content hash, sha256 over its weight files, computed beside the work before it is needed.

Hashing reads every byte of the source, and the steps before a conversion writes anything (importing the model's classes, building its skeleton
on the meta device, planning) hold the GIL and read no weights. hashlib releases the GIL while it
digests a chunk, so :class:`Digest` reads and digests on a thread of its own from the moment the
files are known, and :meth:`Digest.result` waits for what is left of it.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

CHUNK_BYTES = 1 << 22


def file_sha256(paths: list[Path], stop: threading.Event | None = None) -> str:
    """The sha256 of the files' bytes, in sorted path order (so independent of how they were listed).
    ``stop`` set: return early with a meaningless digest (nobody will read it)."""
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK_BYTES)  # one buffer for every read
    view = memoryview(buffer)
    for path in sorted(paths):
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                if stop is not None and stop.is_set():
                    return ""
                digest.update(view[:n])
    return digest.hexdigest()


class Digest:
    """:func:`file_sha256` of ``paths``, started on a daemon thread at construction."""

    def __init__(self, paths: list[Path]):
        self.paths = list(paths)
        self._stop = threading.Event()
        self._value: str | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="lors-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = file_sha256(self.paths, self._stop)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread by result()
            self._error = e

    def result(self) -> str:
        """The hex digest (waits for the thread); the thread's error, if reading failed."""
        if self._stop.is_set():
            raise RuntimeError("internal: the digest was cancelled")
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value

    def cancel(self) -> None:
        """Stop reading (a dry run, or an error before anything is written)."""
        self._stop.set()


__all__ = ["Digest", "file_sha256"]
