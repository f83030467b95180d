"""Time as an input: breakers, buckets, backoff and expiry read a ``Clock`` so tests can
move it by hand instead of sleeping."""

from __future__ import annotations

import time
from typing import Protocol

__all__ = ["Clock", "MonotonicClock"]


class Clock(Protocol):
    def monotonic(self) -> float: ...


class MonotonicClock:
    def monotonic(self) -> float:
        return time.monotonic()
