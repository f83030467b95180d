"""glibc's heap, kept from shrinking and growing again around every large read.

uvloop hands each read of a plain connection to ``data_received`` as a new bytes object, up
to 256 KiB, and the parser copies a body out of it into another: on a large body, about
half a megabyte is allocated and freed per read. glibc gives the top of its heap back to the
kernel (``brk``) once more than ``M_TRIM_THRESHOLD`` is free there, so each read grew the heap
again (three ``brk`` calls a read, strace) and touched fresh, zero-filled pages: relaying a
large body cost the sidecar 1.1-1.25 ms of CPU per MiB. With ``M_TOP_PAD`` the heap keeps
4 MiB at its top across trims, and the same pages serve the next read: 0.31-0.39 ms per MiB,
as when the connections read into a buffer of their own (bench/README.md).

Setting the pad also freezes glibc's mmap threshold where it stands (any of ``M_TOP_PAD``,
``M_TRIM_THRESHOLD`` or ``M_MMAP_THRESHOLD`` turns its adjustment off). It starts at 128 KiB
and rises only when a larger mmapped block is freed; the first large read is still alive
when the pad is set, so whether the threshold had risen past a read's size depended on what
the process had freed before (a test saw 7,980 page faults for 64 MiB once in many runs,
~250 in the others). So the threshold is set with the pad, to ``HEAP_MMAP_THRESHOLD``:
reads and the copies made of them always come from the heap, whatever ran earlier.

Set at the first large read, not at start: a pad kept from start-up on cost a sidecar that
only ever sees small requests 1.5 MB of RSS (and ``ctypes`` 0.4 MB more), for nothing. A
process-wide setting of the C library: setting it again is the same setting, so a
connection reading a large body sets it without asking whether another did. Not glibc
(musl, macOS): ``mallopt`` is missing or a no-op, nothing changes.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Final

__all__ = ["HEAP_MMAP_THRESHOLD", "HEAP_TOP_PAD", "LARGE_READ", "keep_heap_slack"]

HEAP_TOP_PAD: Final = 4 << 20  # two reads' allocations with room: 2 MiB was enough, 1 MiB not
HEAP_MMAP_THRESHOLD: Final = 1 << 20  # above a read (256 KiB) and a copy of one: from the heap
LARGE_READ: Final = 64 * 1024  # a read this large is a body being relayed (a head is < 64 KiB)
_M_TOP_PAD: Final = -2  # glibc's malloc.h
_M_MMAP_THRESHOLD: Final = -3


@cache
def _mallopt() -> Callable[[int, int], int] | None:
    import ctypes  # here: a sidecar that relays no large body never loads it

    try:
        mallopt: Callable[[int, int], int] = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    return mallopt


def keep_heap_slack(nbytes: int = HEAP_TOP_PAD) -> bool:
    """Keep ``nbytes`` at the heap's top when glibc trims it, and blocks up to
    ``HEAP_MMAP_THRESHOLD`` in the heap; False where that cannot be set.
    A connection calls it for each read of ``LARGE_READ`` bytes or more (two ``mallopt``
    calls through ctypes, a few µs at most, against the tens a read that large costs)."""
    mallopt = _mallopt()
    return mallopt is not None and bool(mallopt(_M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD)) \
        and bool(mallopt(_M_TOP_PAD, nbytes))
