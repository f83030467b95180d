"""A clock that moves only when a test says so (uvicorn's ``MockLoop.run_later``, for time).

Satisfies ``sidecar.clock.Clock``: code that reads ``clock.monotonic()`` runs against it in
unit tests, which ``advance`` time instead of sleeping.
"""

from __future__ import annotations

__all__ = ["FakeClock"]


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        # Not 0: code must not assume time starts at zero.
        self.now = start

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        """Move time forward by ``seconds`` (never back: a monotonic clock does not) and
        return the new time."""
        if seconds < 0:
            raise ValueError(f"a monotonic clock does not go back, got {seconds}")
        self.now += seconds
        return self.now
