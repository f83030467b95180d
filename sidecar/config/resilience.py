"""Config of failure containment: retries, circuit breaker, health checks, outlier ejection,
load balancing (per service) and fault injection (per route).

Frozen slotted dataclasses and one ``parse_X(node: Fields)`` per section; each reports bad
values with their full path and unknown keys through ``Fields``, and calls ``node.done()``.
Defaults live here and nowhere else. Pure: no I/O. The YAML shape; the values shown are the
defaults, except where a comment says optional or e.g.::

    services:
      orders:
        retries:
          attempts: 1                  # retries after the first try, 0..10 (0: never retry)
          on: [connect-failure, reset, "503"]
                                       # connect-failure | reset | timeout | 5xx | gateway-error
                                       # | retriable-4xx (409) | a status code 400..599
          per_try_timeout: 500ms       # optional; unset: a try may use what the route leaves
          backoff: {base: 25ms, max: 250ms}   # full jitter: uniform(0, min(max, base·2^(retry-1)))
          budget: 20%                  # or {percent: 20%, min_retries: 3, window: 10s}: retries are
                                       # at most percent of the requests seen in the window (or
                                       # min_retries): a failing upstream never sees a retry storm
          retry_non_idempotent: false  # true: POST, PATCH, CONNECT are retried too
          max_replay_body: 64KiB       # a larger request body is streamed, not kept: never retried
          honour_retry_after: true     # a 429/503 Retry-After sets the backoff ...
          max_retry_after: 10s         # ... unless it asks for longer than this: then no retry
        breaker:
          consecutive_failures: 5      # trips after this many failures in a row (0: off)
          error_rate: {threshold: 50%, window: 10s, min_requests: 20}   # optional; absent: off
          open_for: 5s                 # first open interval; doubles on each re-trip ...
          open_for_max: 60s            # ... up to this; back to open_for after a close
          half_open_requests: 1        # trial requests; all must succeed to close
          failure_on: [connect-failure, reset, timeout, 5xx]   # also: gateway-error (502/503/504)
          max_connections: 1024        # concurrency limits for the whole cluster (503 UO)
          max_pending: 1024
          max_requests: 1024
          max_retries: 3               # retries in flight at once
        health_check:                  # optional; absent or empty: no active checks
          path: /healthz               # required when the section is given
          interval: 10s
          jitter: 1s                   # each round waits interval ± jitter
          timeout: 1s                  # connect + request + status line; ≤ interval
          healthy_threshold: 2         # passes in a row to mark an endpoint up
          unhealthy_threshold: 3       # failures in a row to mark it down
          expected_statuses: [200-299] # codes (204) or ranges ("200-399")
          host: orders                 # optional Host header; default: the cluster's name
        outlier:                       # passive ejection from real traffic
          consecutive_5xx: 5           # 0: off; connect failures, resets, timeouts count as 5xx
          consecutive_gateway_errors: 0   # 502/503/504 (and local failures); 0: off
          base_ejection_time: 30s      # ejected for base × times ejected ...
          max_ejection_time: 300s      # ... at most this
          max_ejected_percent: 10%     # never eject more (but always allow one)
        load_balancer:
          policy: round_robin          # round_robin (smooth weighted) | least_request (P2C)
          weights: {"10.0.0.5:15006": 3}   # e.g.; endpoint address -> 1..1000; unlisted: 1
          panic_threshold: 50%         # fewer available than this: use all endpoints (0%: never)
        routes:
          - match: {path_prefix: /}
            fault:                     # optional; absent: no faults. Needs delay, abort or both,
              delay: {fixed: 2s, percent: 10%}      # or from_headers. e.g.; percent default 100%
              abort: {status: 503, percent: 5%}     # e.g.; status 400..599
              when_header: x-chaos     # optional; only requests carrying this header are faulted
              from_headers: false      # true: honour x-pake-fault-delay: 300ms
                                       # and x-pake-fault-abort: 503 request headers
              max_header_delay: 10s    # cap on a delay asked for by a header
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

Address = tuple[str, int]  # as in model.py, which imports this module
from .reader import Fields, Problems, parse_address

__all__ = [
    "BREAKER_FAILURES",
    "BreakerConfig",
    "ErrorRateConfig",
    "FaultAbort",
    "FaultConfig",
    "FaultDelay",
    "HealthCheckConfig",
    "LoadBalancerConfig",
    "OutlierConfig",
    "RETRY_CONDITIONS",
    "RetryBudgetConfig",
    "RetryConfig",
    "ServiceResilience",
    "check_weights",
    "parse_breaker",
    "parse_fault",
    "parse_health_check",
    "parse_load_balancer",
    "parse_outlier",
    "parse_retries",
    "parse_service_resilience",
]

RETRY_CONDITIONS = ("connect-failure", "reset", "timeout", "5xx", "gateway-error", "retriable-4xx")
BREAKER_FAILURES = ("connect-failure", "reset", "timeout", "5xx", "gateway-error")
HEADER_NAME = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")
_STATUS_RANGE = re.compile(r"^\s*(\d{3})\s*-\s*(\d{3})\s*$")


# === retries =============================================================================


@dataclass(frozen=True, slots=True)
class RetryBudgetConfig:
    percent: float = 0.2  # retries ≤ percent × requests in the window ...
    min_retries: int = 3  # ... or this many, whichever is more, so a quiet service can retry
    window: float = 10.0


@dataclass(frozen=True, slots=True)
class RetryConfig:
    attempts: int = 1  # retries, not counting the first try: a request is tried attempts+1 times
    on: frozenset[str] = frozenset({"connect-failure", "reset"})  # names from RETRY_CONDITIONS
    on_statuses: frozenset[int] = frozenset({503})
    per_try_timeout: float | None = None
    backoff_base: float = 0.025
    backoff_max: float = 0.250
    budget: RetryBudgetConfig = RetryBudgetConfig()
    retry_non_idempotent: bool = False
    max_replay_body: int = 64 * 1024
    honour_retry_after: bool = True
    max_retry_after: float = 10.0


def parse_retries(node: Fields) -> RetryConfig:
    d = RetryConfig()
    attempts = node.int("attempts", d.attempts, min=0, max=10)
    on, on_statuses = d.on, d.on_statuses
    if node.has("on"):
        names, statuses = set(), set()
        for path, item in node.list("on"):
            status = _status(item, 400)
            if status is not None:
                statuses.add(status)
            elif isinstance(item, str) and item in RETRY_CONDITIONS:
                names.add(item)
            else:
                node.problems.add(path, f"must be one of {', '.join(RETRY_CONDITIONS)} or a status "
                                        f"code like \"503\", got {item!r}")
        on, on_statuses = frozenset(names), frozenset(statuses)
    per_try_timeout = node.duration("per_try_timeout", None, min=0.001)
    backoff = node.sub("backoff")
    base = backoff.duration("base", d.backoff_base)
    bmax = backoff.duration("max", d.backoff_max)
    if bmax < base:
        backoff.error("max", f"must be ≥ base ({_secs(base)}), got {backoff.data['max']!r}")
        bmax = base
    backoff.done()
    config = RetryConfig(
        attempts=attempts,
        on=on,
        on_statuses=on_statuses,
        per_try_timeout=per_try_timeout,
        backoff_base=base,
        backoff_max=bmax,
        budget=_retry_budget(node),
        retry_non_idempotent=node.bool("retry_non_idempotent", d.retry_non_idempotent),
        max_replay_body=_bounded_size(node, "max_replay_body", d.max_replay_body, 16 * 1024**2),
        honour_retry_after=node.bool("honour_retry_after", d.honour_retry_after),
        max_retry_after=node.duration("max_retry_after", d.max_retry_after),
    )
    node.done()
    return config


def _retry_budget(node: Fields) -> RetryBudgetConfig:
    d = RetryBudgetConfig()
    value = node.data.get("budget")
    if value is not None and not isinstance(value, dict):  # the short form, ``budget: 20%``
        return RetryBudgetConfig(percent=node.percent("budget", d.percent))
    sub = node.sub("budget")
    budget = RetryBudgetConfig(
        percent=sub.percent("percent", d.percent),
        min_retries=sub.int("min_retries", d.min_retries, min=0, max=10_000),
        window=sub.duration("window", d.window, min=0.1),
    )
    sub.done()
    return budget


# === circuit breaker =====================================================================


@dataclass(frozen=True, slots=True)
class ErrorRateConfig:
    threshold: float = 0.5  # trips when failures / requests ≥ this ...
    window: float = 10.0  # ... over this sliding window ...
    min_requests: int = 20  # ... once the window holds at least this many requests


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    consecutive_failures: int = 5  # 0: never trips on a run of failures
    error_rate: ErrorRateConfig | None = None
    open_for: float = 5.0
    open_for_max: float = 60.0
    half_open_requests: int = 1
    failure_on: frozenset[str] = frozenset({"connect-failure", "reset", "timeout", "5xx"})
    max_connections: int = 1024
    max_pending: int = 1024
    max_requests: int = 1024
    max_retries: int = 3


def parse_breaker(node: Fields) -> BreakerConfig:
    d = BreakerConfig()
    error_rate = None
    rate = _optional(node, "error_rate")
    if rate is not None:
        e = ErrorRateConfig()
        error_rate = ErrorRateConfig(
            threshold=rate.percent("threshold", e.threshold),
            window=rate.duration("window", e.window, min=0.1),
            min_requests=rate.int("min_requests", e.min_requests, min=1, max=1_000_000),
        )
        if error_rate.threshold == 0:
            rate.error("threshold", "must be > 0%, got '0%'")
        rate.done()
    open_for = node.duration("open_for", d.open_for, min=0.001)
    open_for_max = node.duration("open_for_max", max(d.open_for_max, open_for), min=0.001)
    if open_for_max < open_for:
        node.error("open_for_max", f"must be ≥ open_for ({_secs(open_for)}), "
                                   f"got {node.data['open_for_max']!r}")
        open_for_max = open_for
    failure_on = d.failure_on
    if node.has("failure_on"):
        names = set()
        for path, item in node.list("failure_on"):
            if isinstance(item, str) and item in BREAKER_FAILURES:
                names.add(item)
            else:
                node.problems.add(path, f"must be one of {', '.join(BREAKER_FAILURES)}, "
                                        f"got {item!r}")
        failure_on = frozenset(names)
    config = BreakerConfig(
        consecutive_failures=node.int("consecutive_failures", d.consecutive_failures,
                                      min=0, max=1_000_000),
        error_rate=error_rate,
        open_for=open_for,
        open_for_max=open_for_max,
        half_open_requests=node.int("half_open_requests", d.half_open_requests, min=1, max=1000),
        failure_on=failure_on,
        max_connections=node.int("max_connections", d.max_connections, min=1, max=1_000_000),
        max_pending=node.int("max_pending", d.max_pending, min=0, max=1_000_000),
        max_requests=node.int("max_requests", d.max_requests, min=1, max=1_000_000),
        max_retries=node.int("max_retries", d.max_retries, min=0, max=1_000_000),
    )
    node.done()
    return config


# === active health checks ================================================================


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    path: str
    interval: float = 10.0
    jitter: float = 1.0
    timeout: float = 1.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3
    expected_statuses: tuple[tuple[int, int], ...] = ((200, 299),)  # inclusive ranges
    host: str | None = None  # Host header; None: the cluster's name

    def expects(self, status: int) -> bool:
        return any(lo <= status <= hi for lo, hi in self.expected_statuses)


def parse_health_check(node: Fields) -> HealthCheckConfig | None:
    """``None`` when the section is absent or empty: the cluster has no active checks."""
    if not node.data:
        node.done()
        return None
    d = HealthCheckConfig(path="/")
    path = node.str("path")
    if isinstance(path, str) and (not path.startswith("/") or any(c in path for c in " \r\n")):
        node.error("path", f"must be a path starting with / and without spaces, got {path!r}")
    interval = node.duration("interval", d.interval, min=0.01)
    jitter = node.duration("jitter", min(d.jitter, interval / 2))
    if jitter >= interval:
        node.error("jitter", f"must be < interval ({_secs(interval)}), got {node.data['jitter']!r}")
        jitter = 0.0
    timeout = node.duration("timeout", min(d.timeout, interval), min=0.001)
    if timeout > interval:
        node.error("timeout", f"must be ≤ interval ({_secs(interval)}), "
                              f"got {node.data['timeout']!r}")
        timeout = interval
    statuses = d.expected_statuses
    if node.has("expected_statuses"):
        ranges = []
        items = node.list("expected_statuses")
        for spath, item in items:
            r = _status_range(item)
            if r is None:
                node.problems.add(spath, f"must be a status code like 200 or a range like "
                                         f"\"200-399\" within 100..599, got {item!r}")
            else:
                ranges.append(r)
        if not items and isinstance(node.data["expected_statuses"], list):
            node.error("expected_statuses", "must list at least one status")
        statuses = tuple(ranges) or d.expected_statuses
    host = node.str("host", None)
    if isinstance(host, str) and any(c in host for c in " \r\n/"):
        node.error("host", f"must be a host name, got {host!r}")
    config = HealthCheckConfig(
        path=path if isinstance(path, str) else "/",
        interval=interval,
        jitter=jitter,
        timeout=timeout,
        healthy_threshold=node.int("healthy_threshold", d.healthy_threshold, min=1, max=100),
        unhealthy_threshold=node.int("unhealthy_threshold", d.unhealthy_threshold, min=1, max=100),
        expected_statuses=statuses,
        host=host,
    )
    node.done()
    return config


# === outlier ejection ====================================================================


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    consecutive_5xx: int = 5  # 0: off
    consecutive_gateway_errors: int = 0  # 0: off
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    max_ejected_percent: float = 0.1


def parse_outlier(node: Fields) -> OutlierConfig:
    d = OutlierConfig()
    base = node.duration("base_ejection_time", d.base_ejection_time, min=0.001)
    max_time = node.duration("max_ejection_time", max(d.max_ejection_time, base), min=0.001)
    if max_time < base:
        node.error("max_ejection_time", f"must be ≥ base_ejection_time ({_secs(base)}), "
                                        f"got {node.data['max_ejection_time']!r}")
        max_time = base
    config = OutlierConfig(
        consecutive_5xx=node.int("consecutive_5xx", d.consecutive_5xx, min=0, max=1_000_000),
        consecutive_gateway_errors=node.int("consecutive_gateway_errors",
                                            d.consecutive_gateway_errors, min=0, max=1_000_000),
        base_ejection_time=base,
        max_ejection_time=max_time,
        max_ejected_percent=node.percent("max_ejected_percent", d.max_ejected_percent),
    )
    node.done()
    return config


# === load balancing ======================================================================


@dataclass(frozen=True, slots=True)
class LoadBalancerConfig:
    policy: str = "round_robin"  # "round_robin" | "least_request"
    weights: tuple[tuple[Address, int], ...] = ()  # endpoints not listed weigh 1
    panic_threshold: float = 0.5

    def weight_of(self, address: Address) -> int:
        for a, w in self.weights:
            if a == address:
                return w
        return 1


def parse_load_balancer(node: Fields) -> LoadBalancerConfig:
    d = LoadBalancerConfig()
    policy = node.str("policy", d.policy, choices=("round_robin", "least_request"))
    weights: list[tuple[Address, int]] = []
    wnode = node.sub("weights")
    for key in list(wnode.data):
        name = str(key)
        try:
            address = parse_address(key)
        except ValueError as exc:
            wnode.raw(key)
            wnode.error(name, str(exc))
            continue
        weight = wnode.int(key, None, min=1, max=1000)
        if weight is not None:
            weights.append((address, weight))
    wnode.done()
    config = LoadBalancerConfig(
        policy=policy,
        weights=tuple(weights),
        panic_threshold=node.percent("panic_threshold", d.panic_threshold),
    )
    node.done()
    return config


def check_weights(config: LoadBalancerConfig, endpoints: tuple[Address, ...], path: str,
                  problems: Problems) -> None:
    """A weight for an address that is not an endpoint is a typo: report it (``path`` is the
    ``load_balancer`` node's). Called by the service parser once both are read."""
    known = set(endpoints)
    for address, _ in config.weights:
        if address not in known:
            host, port = address
            problems.add(f"{path}.weights", f"{host}:{port} is not an endpoint of this service")


# === fault injection =====================================================================


@dataclass(frozen=True, slots=True)
class FaultDelay:
    fixed: float
    percent: float = 1.0


@dataclass(frozen=True, slots=True)
class FaultAbort:
    status: int
    percent: float = 1.0


@dataclass(frozen=True, slots=True)
class FaultConfig:
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None
    when_header: str | None = None  # lower case; None: every request is a candidate
    from_headers: bool = False  # honour x-pake-fault-delay / x-pake-fault-abort
    max_header_delay: float = 10.0


def parse_fault(node: Fields) -> FaultConfig | None:
    """``None`` when the section is absent or empty: faults are off unless configured."""
    if not node.data:
        node.done()
        return None
    d = FaultConfig()
    delay = None
    dnode = _optional(node, "delay")
    if dnode is not None:
        fixed = dnode.duration("fixed", min=0.0)
        delay_percent = dnode.percent("percent", 1.0)
        if isinstance(fixed, float) and fixed > 3600:
            dnode.error("fixed", f"must be ≤ 1h, got {dnode.data['fixed']!r}")
        elif isinstance(fixed, float):
            delay = FaultDelay(fixed=fixed, percent=delay_percent)
        dnode.done()
    abort = None
    anode = _optional(node, "abort")
    if anode is not None:
        status = anode.int("status", min=400, max=599)
        abort_percent = anode.percent("percent", 1.0)
        if isinstance(status, int):
            abort = FaultAbort(status=status, percent=abort_percent)
        anode.done()
    when_header = node.str("when_header", None)
    if isinstance(when_header, str):
        if not HEADER_NAME.match(when_header.lower()):
            node.error("when_header", f"must be a header name, got {when_header!r}")
            when_header = None
        else:
            when_header = when_header.lower()
    from_headers = node.bool("from_headers", d.from_headers)
    config = FaultConfig(
        delay=delay,
        abort=abort,
        when_header=when_header,
        from_headers=from_headers,
        max_header_delay=node.duration("max_header_delay", d.max_header_delay),
    )
    if dnode is None and anode is None and not from_headers:
        node.problems.add(node.path, "must configure delay, abort or from_headers: true")
    node.done()
    return config


# === a service's sections together =======================================================


@dataclass(frozen=True, slots=True)
class ServiceResilience:
    retries: RetryConfig = RetryConfig()
    breaker: BreakerConfig = BreakerConfig()
    health_check: HealthCheckConfig | None = None
    outlier: OutlierConfig = OutlierConfig()
    load_balancer: LoadBalancerConfig = LoadBalancerConfig()


def parse_service_resilience(node: Fields,
                             endpoints: tuple[Address, ...] = ()) -> ServiceResilience:
    """Read ``retries``, ``breaker``, ``health_check``, ``outlier`` and ``load_balancer`` from a
    service's node. Does not call ``node.done()``: the service parser owns the other keys."""
    load_balancer = parse_load_balancer(node.sub("load_balancer"))
    if endpoints:
        check_weights(load_balancer, endpoints, node.at("load_balancer"), node.problems)
    return ServiceResilience(
        retries=parse_retries(node.sub("retries")),
        breaker=parse_breaker(node.sub("breaker")),
        health_check=parse_health_check(node.sub("health_check")),
        outlier=parse_outlier(node.sub("outlier")),
        load_balancer=load_balancer,
    )


# === helpers =============================================================================


def _optional(node: Fields, key: str) -> Fields | None:
    """A nested mapping that switches a feature on: absent, null or empty mean off."""
    if not node.has(key):
        return None
    value = node.data[key]
    if value is None or value == {}:
        node.raw(key)
        return None
    return node.sub(key)


def _status(item: Any, low: int) -> int | None:
    """A status code given as 503 or "503", within ``low``..599."""
    if isinstance(item, bool):
        return None
    if isinstance(item, str) and item.strip().isdigit():
        item = int(item)
    if isinstance(item, int) and low <= item <= 599:
        return item
    return None


def _status_range(item: Any) -> tuple[int, int] | None:
    single = _status(item, 100)
    if single is not None:
        return single, single
    if isinstance(item, str):
        m = _STATUS_RANGE.match(item)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if 100 <= lo <= hi <= 599:
                return lo, hi
    return None


def _bounded_size(node: Fields, key: str, default: int, maximum: int) -> int:
    value: int = node.size(key, default)
    if value > maximum:
        node.error(key, f"must be ≤ {maximum // 1024**2}MiB, got {node.data[key]!r}")
        return default
    return value


def _secs(value: float) -> str:
    return f"{value * 1000:g}ms" if value < 1 else f"{value:g}s"
