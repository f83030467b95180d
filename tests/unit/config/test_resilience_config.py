"""Parsing the resilience sections: defaults, errors that name path and value, unknown keys."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from sidecar.config.reader import Fields, Problems
from sidecar.config.resilience import (
    BreakerConfig,
    ErrorRateConfig,
    FaultAbort,
    FaultConfig,
    FaultDelay,
    HealthCheckConfig,
    LoadBalancerConfig,
    OutlierConfig,
    RetryBudgetConfig,
    RetryConfig,
    ServiceResilience,
    parse_breaker,
    parse_fault,
    parse_health_check,
    parse_load_balancer,
    parse_outlier,
    parse_retries,
    parse_service_resilience,
)

SVC = "services.orders"


def parse(fn: Callable[[Fields], Any], data: Any, path: str) -> tuple[Any, list[str]]:
    problems = Problems()
    result = fn(Fields(data, path, problems))
    return result, problems.items


def ok(fn: Callable[[Fields], Any], data: Any, path: str = "x") -> Any:
    result, problems = parse(fn, data, path)
    assert problems == []
    return result


# --- retries --------------------------------------------------------------------------


def test_retries_defaults() -> None:
    config = ok(parse_retries, None)
    assert config == RetryConfig()
    assert config.attempts == 1
    assert config.on == {"connect-failure", "reset"} and config.on_statuses == {503}
    assert config.per_try_timeout is None
    assert (config.backoff_base, config.backoff_max) == (0.025, 0.25)
    assert config.budget is None  # not set: the default budget, or on a route the service's
    assert RetryBudgetConfig() == RetryBudgetConfig(percent=0.2, min_retries=3, window=10.0)
    assert not config.retry_non_idempotent and config.max_replay_body == 64 * 1024
    assert config.honour_retry_after and config.max_retry_after == 10.0


def test_retries_full() -> None:
    config = ok(parse_retries, {
        "attempts": 3, "on": ["5xx", "retriable-4xx", "429", 502], "per_try_timeout": "500ms",
        "backoff": {"base": "10ms", "max": "1s"}, "budget": "25%",
        "retry_non_idempotent": True, "max_replay_body": "1MiB",
        "honour_retry_after": False, "max_retry_after": "3s"})
    assert config.attempts == 3
    assert config.on == {"5xx", "retriable-4xx"} and config.on_statuses == {429, 502}
    assert config.per_try_timeout == 0.5
    assert (config.backoff_base, config.backoff_max) == (0.01, 1.0)
    assert config.budget == RetryBudgetConfig(percent=0.25, min_retries=3)
    assert config.retry_non_idempotent and config.max_replay_body == 1024 * 1024
    assert not config.honour_retry_after and config.max_retry_after == 3.0


def test_retries_budget_null_is_not_set() -> None:
    assert ok(parse_retries, {"budget": None}).budget is None


def test_retries_budget_long_form() -> None:
    config = ok(parse_retries, {"budget": {"percent": "10%", "min_retries": 0, "window": "30s"}})
    assert config.budget == RetryBudgetConfig(percent=0.1, min_retries=0, window=30.0)


@pytest.mark.parametrize(("data", "problem"), [
    ({"attempts": -1}, f"{SVC}.retries.attempts: must be ≥ 0, got -1"),
    ({"attempts": 11}, f"{SVC}.retries.attempts: must be ≤ 10, got 11"),
    ({"on": ["reset", "oops"]}, f"{SVC}.retries.on[1]: must be one of connect-failure, reset, "
                                "timeout, 5xx, gateway-error, retriable-4xx or a status code "
                                "like \"503\", got 'oops'"),
    ({"on": ["200"]}, f"{SVC}.retries.on[0]: must be one of"),
    ({"per_try_timeout": 5}, f"{SVC}.retries.per_try_timeout: must be a duration like 500ms "
                             "or 1h30m, got 5"),
    ({"backoff": {"base": "1s", "max": "100ms"}},
     f"{SVC}.retries.backoff.max: must be ≥ base (1s), got '100ms'"),
    ({"budget": "120%"}, f"{SVC}.retries.budget: must be a percentage from 0% to 100%, got '120%'"),
    ({"budget": 20}, f"{SVC}.retries.budget: must be a percentage from 0% to 100%, got 20"),
    ({"budget": {"min_retries": -2}}, f"{SVC}.retries.budget.min_retries: must be ≥ 0, got -2"),
    ({"max_replay_body": "1GiB"}, f"{SVC}.retries.max_replay_body: must be ≤ 16MiB, got '1GiB'"),
    ({"retry_non_idempotent": "yes"}, f"{SVC}.retries.retry_non_idempotent: must be true or "
                                      "false, got 'yes'"),
    ({"atempts": 2}, f"{SVC}.retries.atempts: unknown key"),
    ({"backoff": {"bsae": "1s"}}, f"{SVC}.retries.backoff.bsae: unknown key"),
    ({"budget": {"pct": "1%"}}, f"{SVC}.retries.budget.pct: unknown key"),
])
def test_retries_errors(data: dict[str, Any], problem: str) -> None:
    _, problems = parse(parse_retries, data, f"{SVC}.retries")
    assert len(problems) == 1, problems
    assert problems[0].startswith(problem)


# --- breaker --------------------------------------------------------------------------


def test_breaker_defaults() -> None:
    config = ok(parse_breaker, {})
    assert config == BreakerConfig()
    assert config.consecutive_failures == 5 and config.error_rate is None
    assert (config.open_for, config.open_for_max, config.half_open_requests) == (5.0, 60.0, 1)
    assert config.failure_on == {"connect-failure", "reset", "timeout", "5xx"}
    assert (config.max_connections, config.max_pending, config.max_requests,
            config.max_retries) == (1024, 1024, 1024, 3)


def test_breaker_full() -> None:
    config = ok(parse_breaker, {
        "consecutive_failures": 0, "error_rate": {"threshold": "25%", "window": "30s",
                                                  "min_requests": 50},
        "open_for": "10s", "open_for_max": "2m", "half_open_requests": 3,
        "failure_on": ["gateway-error", "timeout"], "max_connections": 10, "max_pending": 0,
        "max_requests": 20, "max_retries": 0})
    assert config.error_rate == ErrorRateConfig(threshold=0.25, window=30.0, min_requests=50)
    assert (config.open_for, config.open_for_max, config.half_open_requests) == (10.0, 120.0, 3)
    assert config.failure_on == {"gateway-error", "timeout"}
    assert (config.max_pending, config.max_retries) == (0, 0)


def test_breaker_error_rate_defaults_and_off() -> None:
    assert ok(parse_breaker, {"error_rate": {"threshold": "40%"}}).error_rate == \
        ErrorRateConfig(threshold=0.4)
    assert ok(parse_breaker, {"error_rate": None}).error_rate is None
    assert ok(parse_breaker, {"open_for": "2m"}).open_for_max == 120.0  # never below open_for


@pytest.mark.parametrize(("data", "problem"), [
    ({"consecutive_failures": -1}, f"{SVC}.breaker.consecutive_failures: must be ≥ 0, got -1"),
    ({"half_open_requests": 0}, f"{SVC}.breaker.half_open_requests: must be ≥ 1, got 0"),
    ({"open_for": "10"}, f"{SVC}.breaker.open_for: must be a duration like 500ms"),
    ({"open_for": "10s", "open_for_max": "5s"}, f"{SVC}.breaker.open_for_max: must be ≥ open_for "
                                                "(10s), got '5s'"),
    ({"failure_on": ["5xx", "4xx"]},
     f"{SVC}.breaker.failure_on[1]: must be one of connect-failure, reset, timeout, 5xx, "
     "gateway-error, got '4xx'"),
    ({"error_rate": {"threshold": "0%"}}, f"{SVC}.breaker.error_rate.threshold: must be > 0%"),
    ({"error_rate": {"min_requests": 0}},
     f"{SVC}.breaker.error_rate.min_requests: must be ≥ 1, got 0"),
    ({"error_rate": {"treshold": "5%"}}, f"{SVC}.breaker.error_rate.treshold: unknown key"),
    ({"max_requests": "many"}, f"{SVC}.breaker.max_requests: must be a whole number, got 'many'"),
    ({"max_request": 5}, f"{SVC}.breaker.max_request: unknown key"),
])
def test_breaker_errors(data: dict[str, Any], problem: str) -> None:
    _, problems = parse(parse_breaker, data, f"{SVC}.breaker")
    assert len(problems) == 1, problems
    assert problems[0].startswith(problem)


# --- health check ---------------------------------------------------------------------


def optional(fn: Callable[[Fields], Any], key: str, data: dict[str, Any]) -> tuple[Any, list[str]]:
    """A section read as its parent reads it: through the one optional-section idiom."""
    problems = Problems()
    result = Fields(data, SVC, problems).optional(key, fn)
    return result, problems.items


def test_health_check_absent_or_null_is_off_and_empty_asks_for_a_path() -> None:
    assert optional(parse_health_check, "health_check", {}) == (None, [])
    assert optional(parse_health_check, "health_check", {"health_check": None}) == (None, [])
    _, problems = optional(parse_health_check, "health_check", {"health_check": {}})
    assert problems and problems[0].startswith(f"{SVC}.health_check.path: ")


def test_health_check_defaults() -> None:
    config = ok(parse_health_check, {"path": "/healthz"})
    assert config == HealthCheckConfig(path="/healthz")
    assert (config.interval, config.jitter, config.timeout) == (10.0, 1.0, 1.0)
    assert (config.healthy_threshold, config.unhealthy_threshold) == (2, 3)
    assert config.expects(200) and config.expects(299) and not config.expects(301)
    assert config.host is None


def test_health_check_full() -> None:
    config = ok(parse_health_check, {
        "path": "/ready", "interval": "2s", "jitter": "500ms", "timeout": "300ms",
        "healthy_threshold": 1, "unhealthy_threshold": 5,
        "expected_statuses": [204, "300-399"], "host": "orders.internal"})
    assert (config.interval, config.jitter, config.timeout) == (2.0, 0.5, 0.3)
    assert config.expected_statuses == ((204, 204), (300, 399))
    assert config.expects(204) and config.expects(302) and not config.expects(200)
    assert config.host == "orders.internal"


def test_health_check_short_interval_shrinks_default_jitter_and_timeout() -> None:
    config = ok(parse_health_check, {"path": "/", "interval": "500ms"})
    assert config.jitter == 0.25 and config.timeout == 0.5


HC = f"{SVC}.health_check"


@pytest.mark.parametrize(("data", "problem"), [
    ({"interval": "5s"}, f"{HC}.path: is required"),
    ({"path": "healthz"}, f"{HC}.path: must be a path starting with / and without spaces, "
                          "got 'healthz'"),
    ({"path": "/a b"}, f"{HC}.path: must be a path starting with /"),
    ({"path": "/", "interval": "1s", "timeout": "2s"}, f"{HC}.timeout: must be ≤ interval (1s), "
                                                       "got '2s'"),
    ({"path": "/", "interval": "1s", "jitter": "1s"}, f"{HC}.jitter: must be < interval (1s)"),
    ({"path": "/", "unhealthy_threshold": 0}, f"{HC}.unhealthy_threshold: must be ≥ 1, got 0"),
    ({"path": "/", "expected_statuses": ["2xx"]}, f"{HC}.expected_statuses[0]: must be a status "
                                                  "code like 200 or a range like \"200-399\" "
                                                  "within 100..599, got '2xx'"),
    ({"path": "/", "expected_statuses": ["399-200"]}, f"{HC}.expected_statuses[0]: must be"),
    ({"path": "/", "expected_statuses": []}, f"{HC}.expected_statuses: must list at least one"),
    ({"path": "/", "hots": "x"}, f"{HC}.hots: unknown key"),
])
def test_health_check_errors(data: dict[str, Any], problem: str) -> None:
    _, problems = parse(parse_health_check, data, HC)
    assert len(problems) == 1, problems
    assert problems[0].startswith(problem)


# --- outlier --------------------------------------------------------------------------


def test_outlier_defaults_and_full() -> None:
    assert ok(parse_outlier, None) == OutlierConfig()
    config = ok(parse_outlier, {"consecutive_5xx": 0, "consecutive_gateway_errors": 3,
                                "base_ejection_time": "10s", "max_ejection_time": "1m",
                                "max_ejected_percent": "50%"})
    assert config == OutlierConfig(0, 3, 10.0, 60.0, 0.5)
    assert ok(parse_outlier, {"base_ejection_time": "10m"}).max_ejection_time == 600.0


@pytest.mark.parametrize(("data", "problem"), [
    ({"consecutive_5xx": -3}, f"{SVC}.outlier.consecutive_5xx: must be ≥ 0, got -3"),
    ({"base_ejection_time": "1m", "max_ejection_time": "30s"},
     f"{SVC}.outlier.max_ejection_time: must be ≥ base_ejection_time (60s), got '30s'"),
    ({"max_ejected_percent": "10"}, f"{SVC}.outlier.max_ejected_percent: must be a percentage"),
    ({"interval": "10s"}, f"{SVC}.outlier.interval: unknown key"),
])
def test_outlier_errors(data: dict[str, Any], problem: str) -> None:
    _, problems = parse(parse_outlier, data, f"{SVC}.outlier")
    assert len(problems) == 1, problems
    assert problems[0].startswith(problem)


# --- load balancer --------------------------------------------------------------------


def test_load_balancer_defaults_and_full() -> None:
    assert ok(parse_load_balancer, {}) == LoadBalancerConfig()
    config = ok(parse_load_balancer, {"policy": "least_request", "panic_threshold": "0%",
                                      "weights": {"10.0.0.5:15006": 3, "[::1]:80": 1}})
    assert config.policy == "least_request" and config.panic_threshold == 0.0
    assert config.weight_of(("10.0.0.5", 15006)) == 3
    assert config.weight_of(("::1", 80)) == 1
    assert config.weight_of(("10.0.0.9", 1)) == 1


LB = f"{SVC}.load_balancer"


@pytest.mark.parametrize(("data", "problem"), [
    ({"policy": "random"}, f"{LB}.policy: must be one of round_robin, least_request, got 'random'"),
    ({"weights": {"10.0.0.5": 3}}, f"{LB}.weights.10.0.0.5: must be an address like "
                                   "127.0.0.1:8080, got '10.0.0.5'"),
    ({"weights": {"10.0.0.5:80": 0}}, f"{LB}.weights.10.0.0.5:80: must be ≥ 1, got 0"),
    ({"weights": ["10.0.0.5:80"]}, f"{LB}.weights: must be a mapping"),
    ({"panic_threshold": 0.5}, f"{LB}.panic_threshold: must be a percentage"),
    ({"polcy": "round_robin"}, f"{LB}.polcy: unknown key"),
])
def test_load_balancer_errors(data: dict[str, Any], problem: str) -> None:
    _, problems = parse(parse_load_balancer, data, LB)
    assert len(problems) == 1, problems
    assert problems[0].startswith(problem)


# --- fault ----------------------------------------------------------------------------


def test_fault_absent_is_off_and_empty_says_what_it_lacks() -> None:
    assert optional(parse_fault, "fault", {}) == (None, [])
    assert optional(parse_fault, "fault", {"fault": None}) == (None, [])
    _, problems = optional(parse_fault, "fault", {"fault": {}})
    assert problems == [f"{SVC}.fault: must configure delay, abort or from_headers: true"]
    _, problems = optional(parse_fault, "fault", {"fault": {"delay": {}}})
    assert problems and problems[0].startswith(f"{SVC}.fault.delay.fixed: ")


def test_breaker_error_rate_empty_is_on_with_its_defaults() -> None:
    assert ok(parse_breaker, {"error_rate": {}}).error_rate == ErrorRateConfig()


def test_fault_full() -> None:
    config = ok(parse_fault, {"delay": {"fixed": "2s", "percent": "10%"},
                              "abort": {"status": 503}, "when_header": "X-Chaos",
                              "from_headers": True, "max_header_delay": "5s"})
    assert config == FaultConfig(delay=FaultDelay(2.0, 0.1), abort=FaultAbort(503, 1.0),
                                 when_header="x-chaos", from_headers=True, max_header_delay=5.0)


def test_fault_from_headers_alone() -> None:
    assert ok(parse_fault, {"from_headers": True}) == FaultConfig(from_headers=True)


FAULT = f"{SVC}.routes[0].fault"


@pytest.mark.parametrize(("data", "problem"), [
    ({"when_header": "x-chaos"}, f"{FAULT}: must configure delay, abort or from_headers: true"),
    ({"abort": {"status": 200}}, f"{FAULT}.abort.status: must be ≥ 400, got 200"),
    ({"abort": {"percent": "5%"}}, f"{FAULT}.abort.status: is required"),
    ({"delay": {"fixed": "2"}}, f"{FAULT}.delay.fixed: must be a duration like 500ms"),
    ({"delay": {"fixed": "2h"}}, f"{FAULT}.delay.fixed: must be ≤ 1h, got '2h'"),
    ({"delay": {"fixed": "1s", "percent": "110%"}}, f"{FAULT}.delay.percent: must be a percentage"),
    ({"abort": {"status": 503}, "when_header": "x chaos"}, f"{FAULT}.when_header: must be a "
                                                           "header name, got 'x chaos'"),
    ({"abort": {"status": 503, "pct": "1%"}}, f"{FAULT}.abort.pct: unknown key"),
    ({"abort": {"status": 503}, "header": "x"}, f"{FAULT}.header: unknown key"),
])
def test_fault_errors(data: dict[str, Any], problem: str) -> None:
    _, problems = parse(parse_fault, data, FAULT)
    assert len(problems) == 1, problems
    assert problems[0].startswith(problem)


# --- a service's sections together ----------------------------------------------------


def test_service_resilience_reads_its_keys_and_leaves_the_rest() -> None:
    problems = Problems()
    node = Fields({"endpoints": ["10.0.0.5:80"], "retries": {"attempts": 2},
                   "health_check": {"path": "/healthz"},
                   "load_balancer": {"weights": {"10.0.0.9:80": 2}}}, SVC, problems)
    config = parse_service_resilience(node, (("10.0.0.5", 80),))
    assert isinstance(config, ServiceResilience)
    assert config.retries.attempts == 2 and config.breaker == BreakerConfig()
    assert config.health_check is not None and config.outlier == OutlierConfig()
    assert problems.items == [f"{SVC}.load_balancer.weights: 10.0.0.9:80 is not an endpoint of "
                              "this service"]
    node.raw("endpoints")
    node.done()  # every resilience key was marked read
    assert len(problems.items) == 1


def test_every_problem_is_reported_at_once() -> None:
    _, problems = parse(parse_breaker, {"open_for": "x", "max_retries": -1, "typo": 1},
                        f"{SVC}.breaker")
    assert len(problems) == 3
