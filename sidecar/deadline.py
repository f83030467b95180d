"""A timer that is cheap to move later: the hot path sets a deadline with one assignment.

Keep-alive idle timers and route timeouts are set and cleared on every request; creating and
cancelling a loop timer each time costs about 1 µs on uvloop, three times per exchange. A
``Deadline`` keeps one armed handle: moving the deadline later only records it; when the
handle fires early it re-arms itself for the rest. Only an earlier deadline re-arms at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Final

__all__ = ["Deadline"]

# The hot path's clock: ``time.monotonic``, a C static once compiled. ``loop.time()`` is a
# method of the loop found by name, or called through a bound method (~230 instructions
# against ~180, callgrind), and it counts from the same clock: uvloop's is libuv's cached
# CLOCK_MONOTONIC, at most a tick behind, so a deadline armed by this clock fires no earlier.
_MONOTONIC: Final = time.monotonic
_NONE: Final = -1.0  # no deadline: the monotonic clock reads no less than 0


class Deadline:
    __slots__ = ("_loop", "_callback", "_at", "_handle", "_armed_for")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._callback = callback
        # the deadline, _NONE for none: a float kept as a C double once compiled, where an
        # Optional one was a new float object at every set (~50 instructions, callgrind)
        self._at = _NONE
        self._handle: asyncio.TimerHandle | None = None
        self._armed_for = 0.0

    @property
    def when(self) -> float | None:
        """The deadline (the monotonic clock's seconds), or None."""
        at = self._at
        return None if at == _NONE else at

    def set_in(self, seconds: float) -> None:
        when = self._at = _MONOTONIC() + seconds
        if self._handle is None or when < self._armed_for:
            self._arm(when)

    def set_at(self, when: float) -> None:
        self._at = when
        if self._handle is None or when < self._armed_for:
            self._arm(when)

    def _arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed_for = when
        self._handle = self._loop.call_at(when, self._fire)

    def clear(self) -> None:
        """No deadline; an armed handle stays and does nothing when it fires."""
        self._at = _NONE

    def cancel(self) -> None:
        self._at = _NONE
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        when = self._at
        if when == _NONE:
            return
        if _MONOTONIC() < when:
            self._armed_for = when
            self._handle = self._loop.call_at(when, self._fire)
            return
        self._at = _NONE
        self._callback()
