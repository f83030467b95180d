"""The ``stats`` message a joined sidecar sends the control plane: what it saw since the last one.

Nothing here runs per request. The counts are the ones ``Metrics.exchange_done`` keeps for
Prometheus anyway; ``StatsReporter.take`` (once a heartbeat) diffs them against what it sent
last, per route and destination, and reads each destination's breaker (state, and trips as a
delta). Only the calling side reports traffic (``outbound`` and ``gateway`` listeners): the
called sidecar's inbound exchange is the same request, and the control plane sums per
destination. Denials (authn, RBAC, rate limit) come from every listener: they are the called
side's decisions. Memory is the counts' own keys (routes x clusters, from config) once more.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from ..discovery.protocol import MAX_DENIALS, MAX_STATS_ROUTES, Denial, RouteStats, Stats
from .metrics import Metrics

__all__ = ["StatsReporter"]

_CALLERS = ("outbound", "gateway")  # listeners whose exchanges are calls to a destination
_NOT_DESTINATIONS = ("-", "local-app")  # no cluster picked; the local app (inbound)
_BREAKER = ("closed", "open", "half_open")  # by BreakerState's value


class StatsReporter:
    """Deltas of one sidecar's counts between two ``take`` calls (pure but for the clock)."""

    def __init__(self, metrics: Metrics, clusters: Callable[[], Mapping[str, Any]], *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._counts = metrics.exchanges
        self._clusters = clusters  # the live snapshot's clusters, by name
        self._clock = clock
        self._since = clock()
        # (listener, route, cluster) -> (count, errors, latency buckets) as last sent
        self._sent: dict[tuple[str, str, str], tuple[int, int, list[int]]] = {}
        self._trips: dict[str, int] = {}  # breaker trips by cluster, as last sent
        self._denied = self._counts.denied

    def take(self) -> Stats | None:
        """The counts since the previous call, or None when there is nothing to tell."""
        now = self._clock()
        c = self._counts
        merged: dict[tuple[str, str], list[Any]] = {}  # (route, destination) -> [requests, errors, latency]
        for key, one in list(c.series.items()):
            listener, route, cluster = key
            if listener not in _CALLERS or cluster in _NOT_DESTINATIONS:
                continue
            before = self._sent.get(key)
            requests = one.count - (before[0] if before else 0)
            if requests <= 0:
                continue
            buckets, all_errors = list(one.buckets), one.errors
            self._sent[key] = (one.count, all_errors, buckets)
            errors = all_errors - (before[1] if before else 0)
            latency = [v - (before[2][i] if before else 0) for i, v in enumerate(buckets)]
            entry = merged.get((route, cluster))
            if entry is None:
                if len(merged) >= MAX_STATS_ROUTES:
                    continue
                merged[(route, cluster)] = [requests, errors, latency]
            else:
                entry[0] += requests
                entry[1] += errors
                entry[2] = [a + b for a, b in zip(entry[2], latency)]
        routes = [self._entry(route, destination, *entry)
                  for (route, destination), entry in sorted(merged.items())]
        denied, self._denied = c.denied - self._denied, c.denied
        recent = list(c.denials)[-min(denied, MAX_DENIALS):] if denied else []
        denials = tuple(Denial(at=at, reason=reason, flag=flag, status=status, source=source,
                               method=method, path=path)
                        for at, reason, flag, status, source, method, path in recent)
        if not routes and not denied:
            return None
        interval = min(max(now - self._since, 1e-3), 86_000.0)
        self._since = now
        return Stats(interval=interval, routes=tuple(routes), denials=denials,
                     denials_dropped=denied - len(denials))

    def _entry(self, route: str, destination: str, requests: int, errors: int,
               latency: list[int]) -> RouteStats:
        """One route's entry; the first for a destination carries its breaker's new trips."""
        cluster = self._clusters().get(destination)
        opens, state = 0, "closed"
        if cluster is not None:
            breaker = cluster.breaker
            state = _BREAKER[int(breaker.state)]
            trips = breaker.trips
            before = self._trips.get(destination, 0)
            opens = trips - before if trips >= before else trips  # (a new cluster: counts anew)
            self._trips[destination] = trips
        return RouteStats(route=route[:256], destination=destination, requests=requests,
                          errors=errors, latency=tuple(latency), breaker_opens=opens,
                          breaker=state)  # type: ignore[arg-type]
