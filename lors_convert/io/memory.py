"""How much memory this machine has free, to decide whether a second copy of a model fits."""
from __future__ import annotations

from pathlib import Path


def available_bytes() -> int | None:
    """``MemAvailable`` from ``/proc/meminfo`` in bytes; None where the kernel does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
