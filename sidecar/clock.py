"""Time as an input: breakers, buckets, backoff and expiry read a ``Clock`` so tests can
move it by hand instead of sleeping.

The one Clock protocol of the sidecar; ``tests/helpers/fake_clock.FakeClock`` implements it.
The per-request hot path (listener, routing, pool, deadlines) reads ``time.monotonic()``
directly, a C static once compiled: no indirection there. The loop's clock is the same one
(uvloop's is libuv's cached CLOCK_MONOTONIC), so its timers take these times."""

from __future__ import annotations

import time
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "MonotonicClock"]


@runtime_checkable
class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds from an arbitrary start; never goes back."""
        ...


class MonotonicClock:
    def monotonic(self) -> float:
        return time.monotonic()
