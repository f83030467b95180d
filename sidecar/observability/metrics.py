"""Prometheus metrics of one sidecar, in a registry of its own (no process globals).

The hot path calls ``exchange_done`` once per exchange: one dict lookup (its ``Series``), a
few increments and a bucket search, no locks and no label validation (about 0.3 µs instead of
1.1 µs with prometheus-client's labelled metrics). Everything else (rare events) uses the
labelled ``Counter`` and ``Gauge`` of ``exposition``, the sidecar's own small stand-in for
prometheus-client (same text out).
The same counts feed the control plane's ``stats`` messages (``mesh_stats``, which takes
deltas of them): the latency counts are kept per route too and summed when scraped, and an
exchange with a flag (rare) also counts as a route's error or as a denial.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Final

from .exposition import (Collector, CollectorRegistry, Counter, CounterMetricFamily, Gauge,
                         HistogramMetricFamily, Metric, generate_latest)

if TYPE_CHECKING:
    from ..exchange import Exchange

__all__ = ["DENIAL_FLAGS", "Metrics", "Series", "latency_bucket"]

# Typed: a bare ``Final`` tuple of float literals compiles to a constant that the module's own
# initialiser then cannot read ("value for final name ... was not set", mypyc 1.x).
_LATENCY_BUCKETS: Final[tuple[float, ...]] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BOUNDS: Final = (*_LATENCY_BUCKETS, float("inf"))
_BOUND_LABELS: Final = tuple("+Inf" if b == float("inf") else repr(b) for b in _BOUNDS)
# Flags of a refusal by policy (authn, RBAC, rate limit): a denial for the control plane.
DENIAL_FLAGS: Final = frozenset({"UAEX", "RBAC", "RL"})
_RECENT_DENIALS: Final = 32  # the protocol's MAX_DENIALS: a stats message carries no more
_MAX_TEXT: Final = 256  # the protocol's bound on a string


def latency_bucket(seconds: float) -> int:
    """``bisect_left(_LATENCY_BUCKETS, seconds)``: the first bound at or above it, or the +Inf
    bucket. A loop from the smallest: most exchanges end in the first buckets, and compiled
    it compares unboxed floats, where ``bisect_left`` compares objects (~750 instructions)."""
    buckets = _LATENCY_BUCKETS
    for i in range(len(buckets)):
        if seconds <= buckets[i]:
            return i
    return len(buckets)


def _cut(text: str) -> str:
    return text if len(text) <= _MAX_TEXT else text[:_MAX_TEXT - 3] + "..."


_CLASS_LABELS: Final = ("other", "1xx", "2xx", "3xx", "4xx", "5xx")  # by status // 100 (0: other)


class Series:
    """What the exchanges of one (listener, route, cluster) added up to. One object per key,
    its counts native fields and lists of ints: an exchange's end does one dict lookup and a
    few increments (compiled, no tuple per status class and no boxed float per bucket)."""

    __slots__ = ("by_class", "buckets", "sum", "count", "failed")

    def __init__(self) -> None:
        self.by_class = [0] * len(_CLASS_LABELS)  # requests by status class, _CLASS_LABELS' order
        self.buckets = [0] * len(_BOUNDS)  # latency counts per bucket (not cumulative)
        self.sum = 0.0  # seconds
        self.count = 0
        self.failed = 0  # exchanges under 500 that still failed (a flag, not DC)

    @property
    def errors(self) -> int:
        """5xx responses and failed exchanges under 500."""
        return self.by_class[5] + self.failed


class _ExchangeCollector(Collector):
    """Per-exchange counters and latency histograms as plain ints, turned into Prometheus
    families only when scraped. The event loop is single-threaded, so per-value locks (as
    prometheus-client's metrics take) would buy nothing on this path."""

    def __init__(self) -> None:
        # (listener, route, cluster) -> its counts (scraped per listener, cluster for latency)
        self.series: dict[tuple[str, str, str], Series] = {}
        # The last exchange's key and series: the next one's strings are most often the same
        # objects (the listener's, the route's and the cluster's names), compared by identity
        # where a key tuple, its hash and a dict look-up cost ~400 instructions (callgrind).
        self.last_key: tuple[str, str, str] | None = None
        self.last = Series()  # (read only under ``last_key``)
        self.local: dict[tuple[str, str], int] = {}
        # (unix time, reason, flag, status, source, method, path), newest last; ``denied``
        # counts them all, so a reader can tell how many the deque no longer holds
        self.denials: deque[tuple[float, str, str, int, str | None, str, str]] = deque(
            maxlen=_RECENT_DENIALS)
        self.denied = 0

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("pake_requests", "Requests by listener, route, cluster and status class",
                                       labels=["listener", "route", "cluster", "status_class"])
        series = list(self.series.items())
        for (listener, route, cluster), one in series:
            for label, value in zip(_CLASS_LABELS, one.by_class):
                if value:
                    requests.add_metric([listener, route, cluster, label], value)
        yield requests
        local = CounterMetricFamily("pake_local_replies", "Replies the sidecar made itself, by flag",
                                    labels=["listener", "flag"])
        for flag_key, value in list(self.local.items()):
            local.add_metric(list(flag_key), value)
        yield local
        latency = HistogramMetricFamily("pake_request_duration_seconds",
                                        "Time from request head to response end", labels=["listener", "cluster"])
        by_cluster: dict[tuple[str, str], Series] = {}  # the routes' series summed
        for (listener, _, cluster), one in series:
            total = by_cluster.get((listener, cluster))
            if total is None:
                total = by_cluster[(listener, cluster)] = Series()
            for i, v in enumerate(one.buckets):
                total.buckets[i] = total.buckets[i] + v
            total.sum += one.sum
        for latency_key, total in by_cluster.items():
            cumulative, buckets = 0.0, []
            for bound, count in zip(_BOUND_LABELS, total.buckets):
                cumulative += count
                buckets.append((bound, cumulative))
            latency.add_metric(list(latency_key), buckets, total.sum)
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
        last = c.last_key
        if last is not None and listener is last[0] and route is last[1] and cluster is last[2]:
            one = c.last
        else:
            key = (listener, route, cluster)
            found = c.series.get(key)
            if found is None:
                found = c.series[key] = Series()
            one = c.last = found
            c.last_key = key
        status_class = status // 100
        # ``x[i] = x[i] + 1``, not ``+=``: compiled, an item's ``+=`` is a generic add of
        # boxed ints (tests/unit/test_compiled_form.py)
        by_class = one.by_class
        i = status_class if 0 < status_class < 6 else 0
        by_class[i] = by_class[i] + 1
        buckets = one.buckets
        i = latency_bucket(seconds)
        buckets[i] = buckets[i] + 1
        one.sum += seconds
        one.count += 1
        flag = ex.flags
        if flag != "-":
            fkey = (listener, flag)
            c.local[fkey] = c.local.get(fkey, 0) + 1
            if status < 500 and flag != "DC":  # (5xx are counted as such; DC is the caller's doing)
                one.failed += 1
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
