"""Passive outlier ejection: counting, ejecting, growing, capping, returning."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from sidecar.config.outlier import OutlierConfig
from sidecar.upstream.endpoint import EndpointState, Outcome
from sidecar.upstream.load_balancer import RoundRobin
from sidecar.upstream.outlier import OutlierDetector
from tests.helpers.fake_clock import FakeClock


class Events:
    def __init__(self) -> None:
        self.items: list[tuple[str, bool, str]] = []

    def __call__(self, endpoint: EndpointState, ejected: bool, reason: str) -> None:
        self.items.append((endpoint.address[0], ejected, reason))


def setup(n: int = 10, **overrides: Any) -> tuple[OutlierDetector, list[EndpointState],
                                                      FakeClock, Events]:
    config = replace(OutlierConfig(consecutive_5xx=3, base_ejection_time=30.0,
                                   max_ejection_time=100.0, max_ejected_percent=0.5), **overrides)
    events = Events()
    endpoints = [EndpointState((f"10.0.0.{i + 1}", 80)) for i in range(n)]
    return OutlierDetector(config, on_change=events), endpoints, FakeClock(), events


def fail(d: OutlierDetector, ep: EndpointState, eps: list[EndpointState], clock: FakeClock,
         times: int, outcome: Outcome = Outcome.STATUS_5XX) -> bool:
    return any([d.record(clock.monotonic(), ep, outcome, eps) for _ in range(times)])


def test_consecutive_5xx_eject_for_the_base_time() -> None:
    d, eps, clock, events = setup()
    assert not fail(d, eps[0], eps, clock, 2)
    assert d.record(clock.monotonic(), eps[0], Outcome.STATUS_5XX, eps)
    assert eps[0].ejected and eps[0].ejected_until == clock.now + 30.0
    assert not eps[0].available(clock.now)
    assert events.items == [("10.0.0.1", True, "consecutive_5xx")]
    assert d.ejections == 1


def test_a_success_resets_the_count() -> None:
    d, eps, clock, _ = setup()
    for _ in range(5):
        fail(d, eps[0], eps, clock, 2)
        d.record(clock.monotonic(), eps[0], Outcome.SUCCESS, eps)
    assert not eps[0].ejected


def test_local_failures_count_as_5xx() -> None:
    d, eps, clock, _ = setup()
    for outcome in (Outcome.CONNECT_FAILURE, Outcome.RESET, Outcome.TIMEOUT):
        d.record(clock.monotonic(), eps[0], outcome, eps)
    assert eps[0].ejected


def test_cancelled_counts_for_nothing() -> None:
    d, eps, clock, _ = setup()
    fail(d, eps[0], eps, clock, 2)
    d.record(clock.monotonic(), eps[0], Outcome.CANCELLED, eps)
    assert eps[0].consecutive_5xx == 2


def test_consecutive_gateway_errors() -> None:
    d, eps, clock, events = setup(consecutive_5xx=0, consecutive_gateway_errors=2)
    d.record(clock.monotonic(), eps[0], Outcome.GATEWAY_ERROR, eps)
    d.record(clock.monotonic(), eps[0], Outcome.STATUS_5XX, eps)  # a 500 breaks the run
    d.record(clock.monotonic(), eps[0], Outcome.GATEWAY_ERROR, eps)
    assert not eps[0].ejected
    d.record(clock.monotonic(), eps[0], Outcome.CONNECT_FAILURE, eps)
    assert eps[0].ejected
    assert events.items[-1][2] == "consecutive_gateway_errors"


def test_zero_thresholds_never_eject() -> None:
    d, eps, clock, _ = setup(consecutive_5xx=0)
    fail(d, eps[0], eps, clock, 100, Outcome.GATEWAY_ERROR)
    assert not eps[0].ejected


def test_ejection_time_grows_with_each_ejection_up_to_the_max() -> None:
    d, eps, clock, _ = setup()
    durations = []
    for _ in range(5):
        fail(d, eps[0], eps, clock, 3)
        durations.append(eps[0].ejected_until - clock.now)
        clock.advance(eps[0].ejected_until - clock.now)
    assert durations == [30.0, 60.0, 90.0, 100.0, 100.0]


def test_a_long_quiet_period_forgives_past_ejections() -> None:
    d, eps, clock, _ = setup()
    fail(d, eps[0], eps, clock, 3)
    clock.advance(30.0)
    fail(d, eps[0], eps, clock, 3)
    assert eps[0].ejected_until - clock.now == 60.0
    clock.advance(60.0 + 30.0 * 5)  # long back in service
    fail(d, eps[0], eps, clock, 3)
    assert eps[0].ejected_until - clock.now == 30.0


def test_results_while_ejected_do_not_lengthen_the_ejection() -> None:
    d, eps, clock, _ = setup()
    fail(d, eps[0], eps, clock, 3)
    until = eps[0].ejected_until
    clock.advance(1.0)
    assert not fail(d, eps[0], eps, clock, 10)
    assert eps[0].ejected_until == until and d.ejections == 1


def test_max_ejected_percent() -> None:
    d, eps, clock, _ = setup(n=4, max_ejected_percent=0.5)
    assert fail(d, eps[0], eps, clock, 3)
    assert fail(d, eps[1], eps, clock, 3)
    assert not fail(d, eps[2], eps, clock, 3)  # a third would be 75%
    assert d.overflows >= 1
    clock.advance(30.0)  # the first two return; now the third may go
    assert fail(d, eps[2], eps, clock, 1)


def test_one_ejection_is_always_allowed() -> None:
    d, eps, clock, _ = setup(n=2, max_ejected_percent=0.1)
    assert fail(d, eps[0], eps, clock, 3)
    assert not fail(d, eps[1], eps, clock, 3)


def test_return_by_time_and_sweep_reports_it_once() -> None:
    d, eps, clock, events = setup(n=3)
    fail(d, eps[1], eps, clock, 3)
    lb = RoundRobin(panic_threshold=0.0)
    picks = {lb.pick(eps, clock.now).address[0] for _ in range(6)}  # type: ignore[union-attr]
    assert "10.0.0.2" not in picks  # an ejected endpoint gets no traffic ...
    clock.advance(29.0)
    assert d.sweep(clock.now, eps) == []
    clock.advance(1.0)
    assert d.sweep(clock.now, eps) == [eps[1]]
    assert d.sweep(clock.now, eps) == []
    assert events.items[-1] == ("10.0.0.2", False, "ejection_time_elapsed")
    picks = {lb.pick(eps, clock.now).address[0] for _ in range(6)}  # type: ignore[union-attr]
    assert "10.0.0.2" in picks  # ... until it returns
    assert eps[1].snapshot(clock.now)["ejected"] is False
