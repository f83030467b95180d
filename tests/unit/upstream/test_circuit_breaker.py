"""The breaker's state machine, every transition, on a clock moved by hand."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from sidecar.config.breaker import BreakerConfig, ErrorRateConfig
from sidecar.errors import CircuitOpen, UpstreamOverflow
from sidecar.upstream.circuit_breaker import (
    Admission,
    BreakerState,
    CircuitBreaker,
    Rejection,
    RejectReason,
    RollingCounts,
)
from sidecar.upstream.endpoint import Outcome
from tests.helpers.fake_clock import FakeClock

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


class Recorder:
    def __init__(self) -> None:
        self.transitions: list[tuple[BreakerState, BreakerState, str]] = []

    def __call__(self, old: BreakerState, new: BreakerState, reason: str) -> None:
        self.transitions.append((old, new, reason))


def make(**overrides: Any) -> tuple[CircuitBreaker, FakeClock, Recorder]:
    config = replace(BreakerConfig(consecutive_failures=3, open_for=10.0, open_for_max=40.0),
                     **overrides)
    recorder = Recorder()
    return CircuitBreaker(config, name="orders", on_transition=recorder), FakeClock(), recorder


def admit(breaker: CircuitBreaker, clock: FakeClock, retry: bool = False) -> Admission:
    result = breaker.try_acquire(clock.monotonic(), retry)
    assert isinstance(result, Admission), result
    return result


def one(breaker: CircuitBreaker, clock: FakeClock, outcome: Outcome) -> None:
    breaker.record(clock.monotonic(), outcome, admit(breaker, clock))


def trip(breaker: CircuitBreaker, clock: FakeClock) -> None:
    for _ in range(breaker.config.consecutive_failures):
        one(breaker, clock, Outcome.CONNECT_FAILURE)
    assert breaker.state is OPEN


def rejected(breaker: CircuitBreaker, clock: FakeClock, retry: bool = False) -> RejectReason:
    result = breaker.try_acquire(clock.monotonic(), retry)
    assert isinstance(result, Rejection), result
    assert not result.admitted
    return result.reason


# --- CLOSED ---------------------------------------------------------------------------


def test_starts_closed_and_admits() -> None:
    breaker, clock, recorder = make()
    admission = admit(breaker, clock)
    assert admission.admitted and not admission.trial and not admission.retry
    assert breaker.active_requests == 1
    breaker.record(clock.monotonic(), Outcome.SUCCESS, admission)
    assert breaker.state is CLOSED and breaker.active_requests == 0
    assert recorder.transitions == []


def test_consecutive_failures_trip_closed_to_open() -> None:
    breaker, clock, recorder = make()
    one(breaker, clock, Outcome.STATUS_5XX)
    one(breaker, clock, Outcome.RESET)
    assert breaker.state is CLOSED
    one(breaker, clock, Outcome.TIMEOUT)
    assert breaker.state is OPEN
    assert recorder.transitions == [(CLOSED, OPEN, "consecutive_failures")]
    assert breaker.trips == 1


def test_a_success_resets_the_run_of_failures() -> None:
    breaker, clock, _ = make()
    for _ in range(10):
        one(breaker, clock, Outcome.CONNECT_FAILURE)
        one(breaker, clock, Outcome.CONNECT_FAILURE)
        one(breaker, clock, Outcome.SUCCESS)
    assert breaker.state is CLOSED


def test_only_configured_outcomes_are_failures() -> None:
    breaker, clock, _ = make(failure_on=frozenset({"connect-failure"}))
    for outcome in (Outcome.STATUS_5XX, Outcome.GATEWAY_ERROR, Outcome.RESET, Outcome.TIMEOUT) * 3:
        one(breaker, clock, outcome)
    assert breaker.state is CLOSED
    trip(breaker, clock)


def test_gateway_error_is_a_failure_under_5xx() -> None:
    breaker, clock, _ = make(failure_on=frozenset({"5xx"}))
    for _ in range(3):
        one(breaker, clock, Outcome.GATEWAY_ERROR)
    assert breaker.state is OPEN


def test_cancelled_counts_for_nothing() -> None:
    breaker, clock, _ = make()
    one(breaker, clock, Outcome.CONNECT_FAILURE)
    one(breaker, clock, Outcome.CONNECT_FAILURE)
    for _ in range(5):
        one(breaker, clock, Outcome.CANCELLED)
    assert breaker.state is CLOSED and breaker.active_requests == 0
    one(breaker, clock, Outcome.CONNECT_FAILURE)
    assert breaker.state is OPEN


def test_consecutive_zero_never_trips_on_a_run() -> None:
    breaker, clock, _ = make(consecutive_failures=0)
    for _ in range(1000):
        one(breaker, clock, Outcome.CONNECT_FAILURE)
    assert breaker.state is CLOSED


# --- OPEN -----------------------------------------------------------------------------


def test_open_rejects_until_the_interval_has_passed() -> None:
    breaker, clock, _ = make()
    trip(breaker, clock)
    assert rejected(breaker, clock) is RejectReason.OPEN
    clock.advance(9.999)
    assert rejected(breaker, clock) is RejectReason.OPEN
    assert rejected(breaker, clock, retry=True) is RejectReason.OPEN
    assert breaker.rejections()["open"] == 3


def test_open_to_half_open_after_the_interval() -> None:
    breaker, clock, recorder = make()
    trip(breaker, clock)
    clock.advance(10.0)
    admission = admit(breaker, clock)
    assert admission.trial
    assert breaker.state is HALF_OPEN
    assert recorder.transitions[-1] == (OPEN, HALF_OPEN, "open_interval_elapsed")


def test_rejection_error_is_503_uo_naming_the_cluster() -> None:
    breaker, clock, _ = make()
    trip(breaker, clock)
    result = breaker.try_acquire(clock.monotonic())
    assert isinstance(result, Rejection)
    error = result.error("orders")
    assert isinstance(error, CircuitOpen)
    reply = error.reply()
    assert (reply.status, reply.flag, reply.error) == (503, "UO", "circuit_open")
    assert "orders" in reply.detail and "open" in reply.detail


def test_an_open_breaker_and_a_full_limit_answer_with_distinct_codes() -> None:
    """Both are 503 UO, but a client must tell "the service failed, back off" from "busy now"."""
    breaker, clock, _ = make(max_requests=1)
    admit(breaker, clock)
    full = breaker.try_acquire(clock.monotonic())
    assert isinstance(full, Rejection) and full.reason is RejectReason.MAX_REQUESTS
    overflow = full.error("orders").reply()
    assert (overflow.status, overflow.flag, overflow.error) == (503, "UO", "upstream_overflow")
    assert isinstance(full.error("orders"), UpstreamOverflow)
    breaker, clock, _ = make()
    trip(breaker, clock)
    opened = breaker.try_acquire(clock.monotonic())
    assert isinstance(opened, Rejection)
    assert opened.error("orders").reply().error == "circuit_open"


# --- failure scope: a failure isolated to one endpoint is not the service's --------------


def test_failures_isolated_to_one_endpoint_never_trip_the_breaker() -> None:
    breaker, clock, _ = make()
    for _ in range(100):
        breaker.record(clock.monotonic(), Outcome.CONNECT_FAILURE, admit(breaker, clock),
                       isolated=True)
    assert breaker.state is CLOSED
    assert breaker.active_requests == 0  # each freed its slot
    assert breaker.snapshot(clock.monotonic())["isolated_failures"] == 100


def test_an_isolated_failure_neither_counts_nor_breaks_a_run_of_failures() -> None:
    breaker, clock, recorder = make()  # trips on 3 in a row
    one(breaker, clock, Outcome.RESET)
    one(breaker, clock, Outcome.RESET)
    breaker.record(clock.monotonic(), Outcome.RESET, admit(breaker, clock), isolated=True)
    assert breaker.state is CLOSED
    one(breaker, clock, Outcome.RESET)  # the third failure of the service as a whole
    assert recorder.transitions == [(CLOSED, OPEN, "consecutive_failures")]


def test_isolated_failures_stay_out_of_the_error_rate_window() -> None:
    breaker, clock, _ = make(consecutive_failures=0,
                             error_rate=ErrorRateConfig(threshold=0.5, window=10.0, min_requests=4))
    for _ in range(10):
        one(breaker, clock, Outcome.SUCCESS)
        breaker.record(clock.monotonic(), Outcome.TIMEOUT, admit(breaker, clock), isolated=True)
    assert breaker.state is CLOSED
    assert breaker.snapshot(clock.monotonic())["window"] == {"requests": 10, "failures": 0}


def test_a_half_open_trial_counts_whatever_its_scope() -> None:
    breaker, clock, recorder = make()
    trip(breaker, clock)
    clock.advance(10.0)
    trial = admit(breaker, clock)
    breaker.record(clock.monotonic(), Outcome.CONNECT_FAILURE, trial, isolated=True)
    assert breaker.state is OPEN and recorder.transitions[-1][2] == "trial_failed"


# --- HALF_OPEN ------------------------------------------------------------------------


def half_open(breaker: CircuitBreaker, clock: FakeClock) -> Admission:
    trip(breaker, clock)
    clock.advance(breaker.config.open_for)
    return admit(breaker, clock)


def test_half_open_admits_only_the_trial_requests() -> None:
    breaker, clock, _ = make(half_open_requests=2)
    first = half_open(breaker, clock)
    second = admit(breaker, clock)
    assert first.trial and second.trial
    assert rejected(breaker, clock) is RejectReason.HALF_OPEN_BUSY


def test_half_open_closes_when_every_trial_succeeds() -> None:
    breaker, clock, recorder = make(half_open_requests=2)
    first = half_open(breaker, clock)
    second = admit(breaker, clock)
    breaker.record(clock.monotonic(), Outcome.SUCCESS, first)
    assert breaker.state is HALF_OPEN
    breaker.record(clock.monotonic(), Outcome.SUCCESS, second)
    assert breaker.state is CLOSED
    assert recorder.transitions[-1] == (HALF_OPEN, CLOSED, "trials_succeeded")
    assert not admit(breaker, clock).trial


def test_half_open_reopens_when_a_trial_fails() -> None:
    breaker, clock, recorder = make()
    trial = half_open(breaker, clock)
    breaker.record(clock.monotonic(), Outcome.GATEWAY_ERROR, trial)
    assert breaker.state is OPEN
    assert recorder.transitions[-1] == (HALF_OPEN, OPEN, "trial_failed")
    assert breaker.trips == 2


def test_a_cancelled_trial_gives_its_slot_back() -> None:
    breaker, clock, _ = make()
    trial = half_open(breaker, clock)
    assert rejected(breaker, clock) is RejectReason.HALF_OPEN_BUSY
    breaker.record(clock.monotonic(), Outcome.CANCELLED, trial)
    assert breaker.state is HALF_OPEN
    assert admit(breaker, clock).trial


def test_open_interval_doubles_on_each_failed_trial_up_to_the_max_and_resets_on_close() -> None:
    breaker, clock, _ = make(open_for=10.0, open_for_max=40.0)
    trip(breaker, clock)  # first trip: the base interval
    clock.advance(9.99)
    assert rejected(breaker, clock) is RejectReason.OPEN
    clock.advance(0.01)
    trial = admit(breaker, clock)
    breaker.record(clock.monotonic(), Outcome.CONNECT_FAILURE, trial)  # re-trip: 20 s
    clock.advance(19.99)
    assert rejected(breaker, clock) is RejectReason.OPEN
    clock.advance(0.01)
    trial = admit(breaker, clock)
    breaker.record(clock.monotonic(), Outcome.CONNECT_FAILURE, trial)  # re-trip: 40 s (max)
    clock.advance(39.99)
    assert rejected(breaker, clock) is RejectReason.OPEN
    clock.advance(0.01)
    trial = admit(breaker, clock)
    breaker.record(clock.monotonic(), Outcome.CONNECT_FAILURE, trial)  # capped: 40 s again
    assert breaker.snapshot(clock.monotonic())["open_for"] == 40.0
    clock.advance(40.0)
    trial = admit(breaker, clock)
    breaker.record(clock.monotonic(), Outcome.SUCCESS, trial)  # closes: back to the base
    assert breaker.state is CLOSED
    trip(breaker, clock)
    clock.advance(9.99)
    assert rejected(breaker, clock) is RejectReason.OPEN
    clock.advance(0.01)
    assert admit(breaker, clock).trial


def test_results_from_before_a_transition_do_not_move_the_state() -> None:
    breaker, clock, _ = make()
    slow = admit(breaker, clock)  # admitted while CLOSED, answers much later
    trip(breaker, clock)
    clock.advance(10.0)
    trial = admit(breaker, clock)
    breaker.record(clock.monotonic(), Outcome.SUCCESS, slow)
    assert breaker.state is HALF_OPEN  # the stale success did not close it
    assert breaker.active_requests == 1  # but its slot was freed
    breaker.record(clock.monotonic(), Outcome.SUCCESS, trial)
    assert breaker.state is CLOSED


def test_stale_failure_after_close_does_not_count() -> None:
    breaker, clock, _ = make(consecutive_failures=1)
    slow = admit(breaker, clock)
    one(breaker, clock, Outcome.RESET)
    clock.advance(10.0)
    one(breaker, clock, Outcome.SUCCESS)
    assert breaker.state is CLOSED
    breaker.record(clock.monotonic(), Outcome.RESET, slow)
    assert breaker.state is CLOSED


# --- error rate over a sliding window -------------------------------------------------


def rate_breaker(**overrides: Any) -> tuple[CircuitBreaker, FakeClock, Recorder]:
    rate = ErrorRateConfig(threshold=0.5, window=10.0, min_requests=10)
    return make(consecutive_failures=0, error_rate=rate, **overrides)


def test_error_rate_trips_at_the_threshold_once_min_requests_seen() -> None:
    breaker, clock, recorder = rate_breaker()
    for _ in range(5):
        one(breaker, clock, Outcome.SUCCESS)
        clock.advance(0.1)
    for _ in range(4):
        one(breaker, clock, Outcome.STATUS_5XX)
        clock.advance(0.1)
    assert breaker.state is CLOSED  # 4/9: below min_requests anyway
    one(breaker, clock, Outcome.STATUS_5XX)  # 5/10 = 50%
    assert breaker.state is OPEN
    assert recorder.transitions == [(CLOSED, OPEN, "error_rate")]


def test_error_rate_below_min_requests_never_trips() -> None:
    breaker, clock, _ = rate_breaker()
    for _ in range(9):
        one(breaker, clock, Outcome.STATUS_5XX)
    assert breaker.state is CLOSED


def test_error_rate_forgets_what_slid_out_of_the_window() -> None:
    breaker, clock, _ = rate_breaker()
    for _ in range(9):
        one(breaker, clock, Outcome.STATUS_5XX)
    clock.advance(10.5)  # the failures are now older than the window
    for _ in range(9):
        one(breaker, clock, Outcome.SUCCESS)
    one(breaker, clock, Outcome.STATUS_5XX)  # 1/10
    assert breaker.state is CLOSED
    window = breaker.snapshot(clock.monotonic())["window"]
    assert window == {"requests": 10, "failures": 1}


def test_rolling_counts_slide_bucket_by_bucket() -> None:
    counts = RollingCounts(window=10.0, buckets=10)
    for t in range(10):
        counts.add(100.0 + t, 1, t % 2)
    assert (counts.a, counts.b) == (10, 5)
    counts.advance(110.0)  # the bucket of t=100 slid out
    assert (counts.a, counts.b) == (9, 5)
    counts.advance(115.0)
    assert (counts.a, counts.b) == (4, 2)
    counts.advance(1000.0)
    assert (counts.a, counts.b) == (0, 0)
    counts.add(999.0, 1, 1)  # a clock that steps back counts in the newest bucket
    assert (counts.a, counts.b) == (1, 1)


# --- concurrency limits ---------------------------------------------------------------


def test_max_requests() -> None:
    breaker, clock, _ = make(max_requests=2)
    a, _b = admit(breaker, clock), admit(breaker, clock)
    assert rejected(breaker, clock) is RejectReason.MAX_REQUESTS
    breaker.record(clock.monotonic(), Outcome.SUCCESS, a)
    admit(breaker, clock)


def test_max_retries_limits_only_retries() -> None:
    breaker, clock, _ = make(max_retries=1)
    retry = admit(breaker, clock, retry=True)
    assert retry.retry and breaker.active_retries == 1
    assert rejected(breaker, clock, retry=True) is RejectReason.MAX_RETRIES
    admit(breaker, clock)  # a first try is not a retry
    breaker.record(clock.monotonic(), Outcome.SUCCESS, retry)
    assert breaker.active_retries == 0
    admit(breaker, clock, retry=True)


def test_pending_and_connection_limits() -> None:
    breaker, _, _ = make(max_pending=1, max_connections=2)
    assert breaker.pending.try_acquire()
    assert not breaker.pending.try_acquire()
    breaker.pending.release()
    breaker.pending.release()  # a double release does not make room beyond the limit
    assert breaker.pending.current == 0
    assert breaker.connections.try_acquire() and breaker.connections.try_acquire()
    assert not breaker.connections.try_acquire()
    counts = breaker.rejections()
    assert counts["max_pending"] == 1 and counts["max_connections"] == 1


def test_double_record_does_not_go_negative() -> None:
    breaker, clock, _ = make()
    admission = admit(breaker, clock, retry=True)
    breaker.record(clock.monotonic(), Outcome.SUCCESS, admission)
    breaker.record(clock.monotonic(), Outcome.SUCCESS, admission)
    assert breaker.active_requests == 0 and breaker.active_retries == 0


# --- reporting ------------------------------------------------------------------------


def test_snapshot_for_clusters_endpoint() -> None:
    breaker, clock, _ = make()
    trip(breaker, clock)
    clock.advance(4.0)
    snap = breaker.snapshot(clock.monotonic())
    assert snap["state"] == "open"
    assert snap["reopens_in"] == pytest.approx(6.0)
    assert snap["trips"] == 1
    assert snap["limits"] == {"max_requests": 1024, "max_retries": 3, "max_pending": 1024,
                              "max_connections": 1024}
    assert int(BreakerState.HALF_OPEN) == 2  # the state gauge's value
    assert "OPEN" in repr(breaker)
