"""Config of the cluster's circuit breaker and its concurrency limits.

Frozen slotted dataclasses and ``parse_*(node: Fields)``: bad values are reported with their
full path, unknown keys through ``Fields``. Defaults live here and nowhere else. Pure: no I/O.
The YAML shape; the values shown are the defaults, except where a comment says optional or e.g.::

    services:
      orders:
        breaker:
          consecutive_failures: 5      # trips after this many failures in a row (0: off);
                                       # a failure isolated to one endpoint (another endpoint
                                       # in use still answers) is the outlier detector's and
                                       # is not counted here, nor in error_rate
          error_rate: {threshold: 50%, window: 10s, min_requests: 20}   # optional; absent: off
          open_for: 5s                 # first open interval; doubles on each re-trip ...
          open_for_max: 60s            # ... up to this; back to open_for after a close
          half_open_requests: 1        # trial requests; all must succeed to close
          failure_on: [connect-failure, reset, timeout, 5xx]   # also: gateway-error (502/503/504)
          max_connections: 1024        # concurrency limits for the whole cluster: 503 UO
                                       # upstream_overflow (an open breaker: circuit_open)
          max_pending: 1024
          max_requests: 1024
          max_retries: 3               # retries in flight at once (a retry of a failure
                                       # isolated to one endpoint takes no slot)
"""

from __future__ import annotations

from dataclasses import dataclass

from .reader import Fields
from .values import secs

__all__ = ["BREAKER_FAILURES", "BreakerConfig", "ErrorRateConfig", "parse_breaker"]

BREAKER_FAILURES = ("connect-failure", "reset", "timeout", "5xx", "gateway-error")


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


def _error_rate(rate: Fields) -> ErrorRateConfig:
    e = ErrorRateConfig()
    config = ErrorRateConfig(
        threshold=rate.percent("threshold", e.threshold),
        window=rate.duration("window", e.window, min=0.1),
        min_requests=rate.int("min_requests", e.min_requests, min=1, max=1_000_000),
    )
    if config.threshold == 0:
        rate.error("threshold", "must be > 0%, got '0%'")
    rate.done()
    return config


def parse_breaker(node: Fields) -> BreakerConfig:
    d = BreakerConfig()
    error_rate = node.optional("error_rate", _error_rate)
    open_for = node.duration("open_for", d.open_for, min=0.001)
    open_for_max = node.duration("open_for_max", max(d.open_for_max, open_for), min=0.001)
    if open_for_max < open_for:
        node.error("open_for_max", f"must be ≥ open_for ({secs(open_for)}), "
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
