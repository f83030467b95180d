"""One Clock: the protocol in sidecar.clock, implemented by the real clock and the tests' fake."""

from __future__ import annotations

import pytest

from sidecar.clock import Clock, MonotonicClock
from tests.helpers.fake_clock import FakeClock


def test_the_fake_and_the_real_clock_are_both_a_clock() -> None:
    fake: Clock = FakeClock()
    real: Clock = MonotonicClock()
    assert isinstance(fake, Clock) and isinstance(real, Clock)
    assert real.monotonic() <= real.monotonic()


def test_the_fake_clock_moves_only_forward_and_only_when_told() -> None:
    clock = FakeClock()
    start = clock.monotonic()
    assert clock.monotonic() == start
    assert clock.advance(1.5) == start + 1.5 == clock.monotonic()
    with pytest.raises(ValueError, match="does not go back"):
        clock.advance(-1)
