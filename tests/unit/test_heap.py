"""The heap's slack (sidecar/heap.py): once set, a large read's memory comes back from the
heap at every read, whatever the process allocated and freed before it was set."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# A read of 256 KiB and the body copied out of it, 64 times (16 MiB), in a process whose
# first large block is the first read: the slack is set while that read is alive, as a
# connection sets it. Prints the minor page faults the reads took.
_READS = """
import resource, sys
sys.path.insert(0, sys.argv[1])
from sidecar.heap import keep_heap_slack
read = bytes(256 * 1024)
assert keep_heap_slack()
del read
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(64):
    read = bytes(256 * 1024)
    body = read[100:]
    del read, body
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_reads_reuse_the_heap_even_when_the_slack_is_set_before_any_large_block_was_freed() -> None:
    """Setting the pad froze glibc's mmap threshold at 128 KiB when no larger block had been
    freed yet: every read was a fresh mmap, ~8,200 faults for these 16 MiB (64 a read). With
    the threshold set alongside, the reads reuse the heap's pages."""
    out = subprocess.run([sys.executable, "-c", _READS, str(REPO)], capture_output=True, text=True,
                         timeout=60, check=True)
    faults = int(out.stdout)
    assert faults < 64 * 4, f"{faults} page faults for 64 reads of 256 KiB"
