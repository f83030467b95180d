"""Prometheus metrics of one sidecar, in a registry of its own (no process globals).

The hot path calls ``exchange_done`` once per exchange: a few dict updates and one bisect,
no locks and no label validation (about 0.3 µs instead of 1.1 µs with prometheus-client's
labelled metrics). Everything else (rare events) uses the labelled ``Counter`` and ``Gauge``
of ``exposition``, the sidecar's own small stand-in for prometheus-client (same text out).
The same counts feed the control plane's ``stats`` messages (``mesh_stats``, which takes
deltas of them): the latency counts are kept per route too and summed when scraped, and an
exchange with a flag (rare) also counts as a route's error or as a denial.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from .exposition import (Collector, CollectorRegistry, Counter, CounterMetricFamily, Gauge,
                         HistogramMetricFamily, Metric, generate_latest)

if TYPE_CHECKING:
    from ..exchange import Exchange

__all__ = ["DENIAL_FLAGS", "Metrics"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0, 30.0)
_BOUNDS = (*_LATENCY_BUCKETS, float("inf"))
_BOUND_LABELS = tuple("+Inf" if b == float("inf") else repr(b) for b in _BOUNDS)
_STATUS_CLASS = {n: f"{n}xx" for n in range(1, 6)}
# Flags of a refusal by policy (authn, RBAC, rate limit): a denial for the control plane.
DENIAL_FLAGS = frozenset({"UAEX", "RBAC", "RL"})
_RECENT_DENIALS = 32  # the protocol's MAX_DENIALS: a stats message carries no more
_MAX_TEXT = 256  # the protocol's bound on a string


def _cut(text: str) -> str:
    return text if len(text) <= _MAX_TEXT else text[:_MAX_TEXT - 3] + "..."


class _ExchangeCollector(Collector):
    """Per-exchange counters and latency histograms as plain ints in dicts, turned into
    Prometheus families only when scraped. The event loop is single-threaded, so per-value
    locks (as prometheus-client's metrics take) would buy nothing on this path."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str, str], int] = {}
        self.local: dict[tuple[str, str], int] = {}
        # (listener, route, cluster) -> bucket counts..., sum, count (scraped per listener, cluster)
        self.latency: dict[tuple[str, str, str], list[float]] = {}
        # (listener, route, cluster) -> exchanges under 500 that still failed (a flag, not DC)
        self.failed: dict[tuple[str, str, str], int] = {}
        # (unix time, reason, flag, status, source, method, path), newest last; ``denied``
        # counts them all, so a reader can tell how many the deque no longer holds
        self.denials: deque[tuple[float, str, str, int, str | None, str, str]] = deque(
            maxlen=_RECENT_DENIALS)
        self.denied = 0

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("pake_requests", "Requests by listener, route, cluster and status class",
                                       labels=["listener", "route", "cluster", "status_class"])
        for key, value in list(self.requests.items()):
            requests.add_metric(list(key), value)
        yield requests
        local = CounterMetricFamily("pake_local_replies", "Replies the sidecar made itself, by flag",
                                    labels=["listener", "flag"])
        for flag_key, value in list(self.local.items()):
            local.add_metric(list(flag_key), value)
        yield local
        latency = HistogramMetricFamily("pake_request_duration_seconds",
                                        "Time from request head to response end", labels=["listener", "cluster"])
        by_cluster: dict[tuple[str, str], list[float]] = {}
        for (listener, _, cluster), values in list(self.latency.items()):
            total = by_cluster.get((listener, cluster))
            if total is None:
                by_cluster[(listener, cluster)] = list(values)
            else:
                for i, v in enumerate(values):
                    total[i] += v
        for latency_key, values in by_cluster.items():
            cumulative, buckets = 0.0, []
            for bound, count in zip(_BOUND_LABELS, values):
                cumulative += count
                buckets.append((bound, cumulative))
            latency.add_metric(list(latency_key), buckets, values[-2])
        yield latency


class _LogDropCollector(Collector):
    """Log lines dropped because their output could not keep up, read from the log channels."""

    def __init__(self, read: Callable[[], Mapping[str, int]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        dropped = CounterMetricFamily("pake_log_dropped", "Log lines dropped: the output did not keep up",
                                      labels=["log"])
        for name, count in sorted(self._read().items()):
            dropped.add_metric([name], count)
        yield dropped


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._exchanges = _ExchangeCollector()
        r.register(self._exchanges)
        self.active_connections = Gauge("pake_downstream_connections_active", "Open downstream connections",
                                        ["listener"], registry=r)
        self.connections_refused = Counter("pake_downstream_connections_refused_total",
                                           "Connections closed at once: a cap reached (reason: "
                                           "max_connections, max_total_connections, max_tls_handshakes)",
                                           ["listener", "reason"], registry=r)
        self.connect_failures = Counter("pake_upstream_connect_failures_total",
                                        "Upstream connect failures and timeouts", ["cluster"], registry=r)
        self.protocol_errors = Counter("pake_downstream_protocol_errors_total",
                                       "Malformed requests refused, by status", ["listener", "status"],
                                       registry=r)

    def exchange_done(self, ex: Exchange, seconds: float) -> None:
        c = self._exchanges
        listener, cluster, status = ex.listener, ex.cluster, ex.status
        route = ex.route.name if ex.route is not None else "-"
        key = (listener, route, cluster, _STATUS_CLASS.get(status // 100, "other"))
        requests = c.requests
        requests[key] = requests.get(key, 0) + 1
        lkey = (listener, route, cluster)
        values = c.latency.get(lkey)
        if values is None:
            values = c.latency[lkey] = [0.0] * (len(_BOUNDS) + 2)
        values[bisect_left(_LATENCY_BUCKETS, seconds)] += 1
        values[-2] += seconds
        values[-1] += 1
        flag = ex.flags
        if flag != "-":
            fkey = (listener, flag)
            c.local[fkey] = c.local.get(fkey, 0) + 1
            if status < 500 and flag != "DC":  # (5xx are counted as such; DC is the caller's doing)
                c.failed[lkey] = c.failed.get(lkey, 0) + 1
            if flag in DENIAL_FLAGS:
                c.denied += 1
                head = ex.request
                source = ex.principal or ex.peer_identity
                c.denials.append((time.time(), _cut(ex.reason or flag), flag, status,
                                  _cut(source) if source else None, head.method, _cut(head.path)))

    def local_reply(self, listener: str, flag: str) -> None:
        """A reply made outside an exchange (a malformed request refused by the parser)."""
        local = self._exchanges.local
        key = (listener, flag)
        local[key] = local.get(key, 0) + 1

    @property
    def exchanges(self) -> _ExchangeCollector:
        """The per-exchange counts as they stand (read by ``mesh_stats`` for deltas)."""
        return self._exchanges

    def watch_log_drops(self, read: Callable[[], Mapping[str, int]]) -> None:
        """Export ``read()`` (dropped lines by log: access, audit, events) at each scrape."""
        self.registry.register(_LogDropCollector(read))

    def render(self) -> bytes:
        return generate_latest(self.registry)
