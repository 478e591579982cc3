"""This process's C heap (glibc malloc): blocks that go back to the system when freed, and freed
heap pages given back between phases.

glibc serves a block below its mmap threshold from the heap and keeps the heap's freed pages for
later blocks; the threshold follows the largest block freed so far, up to 32 MiB. A conversion frees
tensors of every size from a few KiB to gigabytes, so after its first large free every block up to
32 MiB comes from the heap, and what each phase frees stays in the RSS under the next phase's work,
fragmented. :func:`return_freed_blocks` fixes the threshold at :data:`MMAP_THRESHOLD`: a block of
that size or more is a mapping of its own, unmapped when it is freed (docs/benchmarks.md measures
the peak and the time it costs). :func:`trim` gives the heap's free pages back. Both do nothing
where the C library is not glibc. No torch.
"""

from __future__ import annotations

import ctypes
import functools
import os

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD = 1 << 20  # bytes: blocks this large or larger are mapped on their own


def return_freed_blocks(environ: dict | None = None) -> bool:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD`, unless the environment sets one
    (``MALLOC_MMAP_THRESHOLD_``, which glibc read at start). Returns whether it was set."""
    env = os.environ if environ is None else environ
    libc = _libc()
    if "MALLOC_MMAP_THRESHOLD_" in env or libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def trim() -> None:
    """Give the heap's free pages back to the system (glibc ``malloc_trim``): without a trim between
    phases, a phase's freed blocks below the threshold stay in the RSS under the next phase's."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


__all__ = ["MMAP_THRESHOLD", "return_freed_blocks", "trim"]
