"""glibc's heap, kept from shrinking and growing again around every large read.

uvloop hands each read of a plain connection to ``data_received`` as a new bytes object, up
to 256 KiB, and the parser copies a body out of it into another: on a large body, about
half a megabyte is allocated and freed per read. glibc gives the top of its heap back to the
kernel (``brk``) once more than ``M_TRIM_THRESHOLD`` is free there, so each read grew the heap
again (three ``brk`` calls a read, strace) and touched fresh, zero-filled pages: relaying a
large body cost the sidecar 1.1-1.25 ms of CPU per MiB. With ``M_TOP_PAD`` the heap keeps
4 MiB at its top across trims, and the same pages serve the next read: 0.23 ms per MiB
(and 0.31-0.39 when the connections read into a buffer of their own; bench/README.md).

A process-wide setting of the C library, so the process's entry point (``__main__``) makes
it once. Not glibc (musl, macOS): ``mallopt`` is missing or a no-op, nothing changes.
"""

from __future__ import annotations

import ctypes
from typing import Final

__all__ = ["HEAP_TOP_PAD", "keep_heap_slack"]

HEAP_TOP_PAD: Final = 4 << 20  # two reads' allocations with room: 2 MiB was enough, 1 MiB not
_M_TOP_PAD: Final = -2  # glibc's malloc.h


def keep_heap_slack(nbytes: int = HEAP_TOP_PAD) -> bool:
    """Keep ``nbytes`` at the heap's top when glibc trims it; False where that cannot be set."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_TOP_PAD, nbytes))
