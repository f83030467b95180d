"""Config of active health checks: what is probed, how often, and when an endpoint flips.

Frozen slotted dataclasses and ``parse_*(node: Fields)``: bad values are reported with their
full path, unknown keys through ``Fields``. Defaults live here and nowhere else. Pure: no I/O.
The YAML shape; the values shown are the defaults, except where a comment says optional or e.g.::

    services:
      orders:
        health_check:                  # optional; absent or empty: no active checks
          path: /healthz               # required when the section is given
          interval: 10s
          jitter: 1s                   # each round waits interval ± jitter
          timeout: 1s                  # connect + request + status line; ≤ interval
          healthy_threshold: 2         # passes in a row to mark an endpoint up
          unhealthy_threshold: 3       # failures in a row to mark it down
          expected_statuses: [200-299] # codes (204) or ranges ("200-399")
          host: orders                 # optional Host header; default: the cluster's name
"""

from __future__ import annotations

from dataclasses import dataclass

from .reader import Fields
from .values import secs, status_range

__all__ = ["HealthCheckConfig", "parse_health_check"]


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


def parse_health_check(node: Fields) -> HealthCheckConfig:
    """A service's ``health_check`` (read through ``Fields.optional``: absent means no active
    checks; present, it needs at least ``path``)."""
    d = HealthCheckConfig(path="/")
    path = node.str("path")
    if isinstance(path, str) and (not path.startswith("/") or any(c in path for c in " \r\n")):
        node.error("path", f"must be a path starting with / and without spaces, got {path!r}")
    interval = node.duration("interval", d.interval, min=0.01)
    jitter = node.duration("jitter", min(d.jitter, interval / 2))
    if jitter >= interval:
        node.error("jitter", f"must be < interval ({secs(interval)}), got {node.data['jitter']!r}")
        jitter = 0.0
    timeout = node.duration("timeout", min(d.timeout, interval), min=0.001)
    if timeout > interval:
        node.error("timeout", f"must be ≤ interval ({secs(interval)}), "
                              f"got {node.data['timeout']!r}")
        timeout = interval
    statuses = d.expected_statuses
    if node.has("expected_statuses"):
        ranges = []
        items = node.list("expected_statuses")
        for spath, item in items:
            r = status_range(item)
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
