"""Fault injection decisions: percentages, a trigger header, header-requested faults."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from sidecar.config.resilience import FaultAbort, FaultConfig, FaultDelay
from sidecar.filters.fault import NO_FAULT, FaultAction, abort_reply, decide


def draws(*values: float) -> Callable[[], float]:
    it = iter(values)
    return lambda: next(it)


def never() -> float:
    raise AssertionError("no draw expected")


def test_off_unless_configured() -> None:
    assert decide(None, [(b"x-pake-fault-abort", b"503")], never) is NO_FAULT
    assert not NO_FAULT.active


def test_delay_a_percentage() -> None:
    config = FaultConfig(delay=FaultDelay(fixed=2.0, percent=0.1))
    assert decide(config, [], draws(0.05)) == FaultAction(delay=2.0)
    assert decide(config, [], draws(0.1)) is NO_FAULT  # [0, 0.1) is the faulted 10%


def test_abort_a_percentage() -> None:
    config = FaultConfig(abort=FaultAbort(status=503, percent=0.5))
    assert decide(config, [], draws(0.49)) == FaultAction(abort_status=503)
    assert decide(config, [], draws(0.5)) is NO_FAULT


def test_delay_and_abort_draw_independently() -> None:
    config = FaultConfig(delay=FaultDelay(1.0, 1.0), abort=FaultAbort(500, 0.2))
    assert decide(config, [], draws(0.0, 0.1)) == FaultAction(1.0, 500)
    assert decide(config, [], draws(0.0, 0.9)) == FaultAction(1.0, None)


def test_percentages_hold_over_many_requests() -> None:
    rng = random.Random(9)
    config = FaultConfig(abort=FaultAbort(503, 0.1))
    aborted = sum(decide(config, [], rng.random).abort_status == 503 for _ in range(10_000))
    assert abs(aborted / 10_000 - 0.1) <= 0.02


def test_when_header_limits_faults_to_requests_carrying_it() -> None:
    config = FaultConfig(abort=FaultAbort(503), when_header="x-chaos")
    assert decide(config, [(b"x-other", b"1")], never) is NO_FAULT
    assert decide(config, [(b"x-chaos", b"1")], draws(0.3)).abort_status == 503


def test_header_requested_faults_only_when_allowed() -> None:
    headers = [(b"x-pake-fault-delay", b"250ms"), (b"x-pake-fault-abort", b"504")]
    assert decide(FaultConfig(abort=FaultAbort(503, 0.0)), headers, draws(0.5)) is NO_FAULT
    config = FaultConfig(from_headers=True)
    assert decide(config, headers, never) == FaultAction(0.25, 504)


@pytest.mark.parametrize(("value", "delay"), [
    (b"300", 0.3), (b"2s", 2.0), (b"1h", 10.0), (b"soon", 0.0), (b"-1", 0.0),
])
def test_header_delay_is_parsed_and_capped(value: bytes, delay: float) -> None:
    config = FaultConfig(from_headers=True, max_header_delay=10.0)
    action = decide(config, [(b"x-pake-fault-delay", value)], never)
    assert action.delay == pytest.approx(delay)


@pytest.mark.parametrize("value", [b"200", b"600", b"abc", b"5033"])
def test_bad_header_abort_is_ignored(value: bytes) -> None:
    config = FaultConfig(from_headers=True)
    assert decide(config, [(b"x-pake-fault-abort", value)], never) is NO_FAULT


def test_header_overrides_the_configured_fault() -> None:
    config = FaultConfig(abort=FaultAbort(503), from_headers=True)
    assert decide(config, [(b"x-pake-fault-abort", b"429")], never).abort_status == 429


def test_abort_reply_is_flagged_fi() -> None:
    reply = abort_reply(FaultAction(abort_status=503), "orders/0")
    assert (reply.status, reply.error, reply.flag) == (503, "fault_injected", "FI")
    assert "orders/0" in reply.detail
