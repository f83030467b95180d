"""Metrics read from live state at scrape time: circuit breakers, endpoint health and
ejection, policy decisions, the audit sink, the JWT key caches, and what live snapshots keep
open (pools, health checkers, superseded snapshots still finishing exchanges).

These objects already count what happens (the breaker its trips and rejections, each
filter its decisions, the audit log its drops); this collector only reads them when
Prometheus asks, so the request path pays nothing for these metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["StateCollector"]


class StateCollector(Collector):
    def __init__(self, *, clusters: Callable[[], Iterable[Any]], filters: Callable[[], Iterable[Any]],
                 audit: Any, jwks: Callable[[], dict[str, Any]], clock: Callable[[], float],
                 upstream: Callable[[], Mapping[str, int]] = dict) -> None:
        self._clusters = clusters
        self._upstream = upstream
        self._filters = filters
        self._audit = audit
        self._jwks = jwks
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        yield from self._cluster_metrics()
        yield from self._policy_metrics()
        yield from self._upstream_metrics()

    def _upstream_metrics(self) -> Iterator[Metric]:
        # Flat while snapshots come and go: growth here is a leak across reloads.
        counts = self._upstream()
        for key, help_text in (
                ("pools", "Upstream connection pools held by live snapshots"),
                ("health_checkers", "Health checkers held by live snapshots"),
                ("retiring_snapshots", "Superseded snapshots whose exchanges are not all finished")):
            if key in counts:
                gauge = GaugeMetricFamily(f"pake_{key}", help_text)
                gauge.add_metric([], counts[key])
                yield gauge

    def _cluster_metrics(self) -> Iterator[Metric]:
        now = self._clock()
        state = GaugeMetricFamily("pake_breaker_state", "Circuit breaker state: 0 closed, 1 open, 2 half-open",
                                  labels=["cluster"])
        trips = CounterMetricFamily("pake_breaker_trips", "Times the breaker opened", labels=["cluster"])
        rejected = CounterMetricFamily("pake_breaker_rejections", "Tries refused at once (503 UO), by reason",
                                       labels=["cluster", "reason"])
        ejections = CounterMetricFamily("pake_outlier_ejections", "Endpoints ejected by outlier detection",
                                        labels=["cluster"])
        healthy = GaugeMetricFamily("pake_endpoint_healthy", "1 when the endpoint passes its health checks",
                                    labels=["cluster", "endpoint"])
        ejected = GaugeMetricFamily("pake_endpoint_ejected", "1 while the endpoint is ejected",
                                    labels=["cluster", "endpoint"])
        for cluster in self._clusters():
            breaker = cluster.breaker
            state.add_metric([cluster.name], int(breaker.state))
            trips.add_metric([cluster.name], breaker.trips)
            for reason, count in breaker.rejections().items():
                rejected.add_metric([cluster.name, reason], count)
            ejections.add_metric([cluster.name], cluster.outlier.ejections)
            for endpoint in cluster.endpoints:
                healthy.add_metric([cluster.name, endpoint.address_text], int(endpoint.healthy))
                ejected.add_metric([cluster.name, endpoint.address_text], int(endpoint.ejected_until > now))
        yield from (state, trips, rejected, ejections, healthy, ejected)

    def _policy_metrics(self) -> Iterator[Metric]:
        decisions = CounterMetricFamily("pake_policy_decisions", "Authentication and authorization decisions"
                                        " (would_deny: a dry-run policy that would have refused)",
                                        labels=["filter", "decision"])
        refused = CounterMetricFamily("pake_filter_refusals", "Requests refused by rate limits and validation",
                                      labels=["filter"])
        for f in self._filters():
            for decision in ("allowed", "denied", "would_deny"):
                if hasattr(f, decision):
                    decisions.add_metric([f.name, decision], getattr(f, decision))
            for counter in ("limited", "refused"):
                if hasattr(f, counter):
                    refused.add_metric([f.name], getattr(f, counter))
        audit = CounterMetricFamily("pake_audit_records", "Audit records by fate (dropped: the queue was full)",
                                    labels=["fate"])
        audit.add_metric(["written"], self._audit.written)
        audit.add_metric(["dropped"], self._audit.dropped)
        audit.add_metric(["write_error"], self._audit.write_errors)
        fetches = CounterMetricFamily("pake_jwks_fetches", "JWKS fetches by provider and result",
                                      labels=["provider", "result"])
        for name, cache in self._jwks().items():
            fetches.add_metric([name, "ok"], cache.fetches - cache.failures)
            fetches.add_metric([name, "failed"], cache.failures)
            fetches.add_metric([name, "suppressed"], cache.refetch_suppressed)
        yield from (decisions, refused, audit, fetches)
