"""The C heap: with the threshold fixed, freed blocks leave the RSS; the user's own setting wins."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lors_convert import heap

# a freed 16 MiB block raises glibc's threshold; 4 MiB blocks then come from the heap, and a live
# block above them keeps their pages from the automatic trim of the heap's top
SCRIPT = """
import sys, torch
from lors_convert.heap import return_freed_blocks
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
if sys.argv[1] == "fixed":
    assert return_freed_blocks()
big = torch.ones(16 << 20, dtype=torch.uint8); del big
before = rss()
blocks = [torch.ones(4 << 20, dtype=torch.uint8) for _ in range(8)]
pin = torch.ones(64 << 10, dtype=torch.uint8)
del blocks
print((rss() - before) / 2**20)
"""


@pytest.mark.skipif(heap._libc() is None or not sys.platform.startswith("linux"), reason="glibc only")
def test_freed_blocks_leave_the_rss_once_the_threshold_is_fixed():
    def kept(mode: str) -> float:  # MiB still in the RSS after 32 MiB were freed
        out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
        return float(out.stdout)

    assert kept("default") > 24  # glibc's own behaviour, the reason for the setting
    assert kept("fixed") < 4


def test_the_environment_setting_is_left_alone():
    assert heap.return_freed_blocks({"MALLOC_MMAP_THRESHOLD_": "65536"}) is False
