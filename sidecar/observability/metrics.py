"""Prometheus metrics of one sidecar, in a registry of its own (no process globals).

The hot path calls ``exchange_done`` once per exchange. Labelled children are cached in
dicts keyed by their label tuple, so a request costs two dict look-ups and three
increments rather than prometheus-client's label validation each time.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0, 30.0)
_STATUS_CLASS = {n: f"{n}xx" for n in range(1, 6)}


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("pake_requests_total", "Requests by listener, route, cluster and status class",
                                ["listener", "route", "cluster", "status_class"], registry=r)
        self.latency = Histogram("pake_request_duration_seconds", "Time from request head to response end",
                                 ["listener", "cluster"], buckets=_LATENCY_BUCKETS, registry=r)
        self.local_replies = Counter("pake_local_replies_total", "Replies the sidecar made itself, by flag",
                                     ["listener", "flag"], registry=r)
        self.active_connections = Gauge("pake_downstream_connections_active", "Open downstream connections",
                                        ["listener"], registry=r)
        self.connections_refused = Counter("pake_downstream_connections_refused_total",
                                           "Connections closed at once: max_connections reached",
                                           ["listener"], registry=r)
        self.connect_failures = Counter("pake_upstream_connect_failures_total",
                                        "Upstream connect failures and timeouts", ["cluster"], registry=r)
        self.protocol_errors = Counter("pake_downstream_protocol_errors_total",
                                       "Malformed requests refused, by status", ["listener", "status"],
                                       registry=r)
        self._requests: dict[tuple[str, str, str, int], Callable[[], None]] = {}
        self._latency: dict[tuple[str, str], Callable[[float], None]] = {}
        self._local: dict[tuple[str, str], Callable[[], None]] = {}

    def exchange_done(self, listener: str, route: str, cluster: str, status: int, flag: str,
                      seconds: float) -> None:
        key = (listener, route, cluster, status // 100)
        inc = self._requests.get(key)
        if inc is None:
            inc = self.requests.labels(listener, route, cluster, _STATUS_CLASS.get(status // 100, "other")).inc
            self._requests[key] = inc
        inc()
        lkey = (listener, cluster)
        observe = self._latency.get(lkey)
        if observe is None:
            observe = self._latency[lkey] = self.latency.labels(listener, cluster).observe
        observe(seconds)
        if flag != "-":
            fkey = (listener, flag)
            linc = self._local.get(fkey)
            if linc is None:
                linc = self._local[fkey] = self.local_replies.labels(listener, flag).inc
            linc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
