"""Prometheus metrics of one sidecar, in a registry of its own (no process globals).

The hot path calls ``exchange_done`` once per exchange: a few dict updates and one bisect,
no locks and no label validation (about 0.3 µs instead of 1.1 µs with prometheus-client's
labelled metrics). Everything else (rare events) uses prometheus-client's metrics directly.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0, 30.0)
_BOUNDS = (*_LATENCY_BUCKETS, float("inf"))
_BOUND_LABELS = tuple("+Inf" if b == float("inf") else repr(b) for b in _BOUNDS)
_STATUS_CLASS = {n: f"{n}xx" for n in range(1, 6)}


class _ExchangeCollector(Collector):
    """Per-exchange counters and latency histograms as plain ints in dicts, turned into
    Prometheus families only when scraped. The event loop is single-threaded, so the
    per-value locks of prometheus-client's own metrics buy nothing on this path."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str, str], int] = {}
        self.local: dict[tuple[str, str], int] = {}
        self.latency: dict[tuple[str, str], list[float]] = {}  # bucket counts..., sum, count

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
        for latency_key, values in list(self.latency.items()):
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
        self.registry = CollectorRegistry(auto_describe=True)
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

    def exchange_done(self, listener: str, route: str, cluster: str, status: int, flag: str,
                      seconds: float) -> None:
        c = self._exchanges
        key = (listener, route, cluster, _STATUS_CLASS.get(status // 100, "other"))
        requests = c.requests
        requests[key] = requests.get(key, 0) + 1
        lkey = (listener, cluster)
        values = c.latency.get(lkey)
        if values is None:
            values = c.latency[lkey] = [0.0] * (len(_BOUNDS) + 2)
        values[bisect_left(_LATENCY_BUCKETS, seconds)] += 1
        values[-2] += seconds
        values[-1] += 1
        if flag != "-":
            fkey = (listener, flag)
            c.local[fkey] = c.local.get(fkey, 0) + 1

    def local_reply(self, listener: str, flag: str) -> None:
        """A reply made outside an exchange (a malformed request refused by the parser)."""
        local = self._exchanges.local
        key = (listener, flag)
        local[key] = local.get(key, 0) + 1

    def watch_log_drops(self, read: Callable[[], Mapping[str, int]]) -> None:
        """Export ``read()`` (dropped lines by log: access, audit, events) at each scrape."""
        self.registry.register(_LogDropCollector(read))

    def render(self) -> bytes:
        return generate_latest(self.registry)
