"""The mesh's traffic, from the sidecars' ``stats`` messages: per destination service, per edge
(source service -> destination service) and per route, over a sliding window.

A window is a ring of fixed time slots (``Window``): counts land in the current slot, a slot
is cleared when its turn comes round, and a sum over the ring is the window. Memory is
slots x keys, whatever the traffic; keys are bounded (``max_keys``; more are dropped and
counted) and a key with nothing in its window is forgotten. Pure: every call takes ``now``
(monotonic seconds); no asyncio, no I/O.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sidecar.config.slo import SloConfig
from sidecar.discovery.protocol import LATENCY_BUCKETS, Denial, RouteStats, Stats

__all__ = ["Counts", "MeshStats", "Window", "quantile"]

N_BUCKETS = len(LATENCY_BUCKETS) + 1
DEFAULT_WINDOW = 60.0
SLOTS = 12
SLO_SLOTS = 60


def quantile(latency: list[int], q: float) -> float | None:
    """The ``q`` quantile (0..1) of a histogram over LATENCY_BUCKETS, interpolated linearly
    inside its bucket (as Prometheus' histogram_quantile does); None when empty. A quantile
    in the +Inf bucket is reported as the last finite bound: "at least that"."""
    total = sum(latency)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(latency):
        if count and seen + count >= rank:
            if i >= len(LATENCY_BUCKETS):
                return LATENCY_BUCKETS[-1]
            low = 0.0 if i == 0 else LATENCY_BUCKETS[i - 1]
            return low + (LATENCY_BUCKETS[i] - low) * (rank - seen) / count
        seen += count
    return LATENCY_BUCKETS[-1]


@dataclass(slots=True)
class Counts:
    requests: int = 0
    errors: int = 0
    breaker_opens: int = 0
    latency: list[int] = field(default_factory=lambda: [0] * N_BUCKETS)

    def add_route(self, r: RouteStats) -> None:
        self.requests += r.requests
        self.errors += r.errors
        self.breaker_opens += r.breaker_opens
        if r.latency:
            self.latency = [a + b for a, b in zip(self.latency, r.latency)]

    def add(self, other: Counts) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.breaker_opens += other.breaker_opens
        self.latency = [a + b for a, b in zip(self.latency, other.latency)]

    def quantile(self, q: float) -> float | None:
        return quantile(self.latency, q)


class Window:
    """``length`` seconds as ``slots`` slots; ``total(now)`` sums the slots still in it."""

    def __init__(self, length: float, slots: int = SLOTS) -> None:
        self.length = length
        self.slot_length = length / slots
        self._ids = [-1] * slots
        self._counts = [Counts() for _ in range(slots)]
        self.started: float | None = None  # when the counts it has seen begin
        self.last_add = -math.inf

    def _slot(self, now: float) -> Counts:
        slot_id = int(now // self.slot_length)
        i = slot_id % len(self._ids)
        if self._ids[i] != slot_id:
            self._ids[i] = slot_id
            self._counts[i] = Counts()
        return self._counts[i]

    def add(self, now: float, route: RouteStats, interval: float) -> None:
        if self.started is None:
            self.started = now - interval
        self.last_add = now
        self._slot(now).add_route(route)

    def seed(self, now: float, counts: Counts, covered: float) -> None:
        """Start with counts already seen (covering ``covered`` seconds up to now)."""
        self.started = now - covered
        self.last_add = now
        self._slot(now).add(counts)

    def total(self, now: float) -> Counts:
        current = int(now // self.slot_length)
        out = Counts()
        for slot_id, counts in zip(self._ids, self._counts):
            if current - len(self._ids) < slot_id <= current:
                out.add(counts)
        return out

    def covered(self, now: float) -> float:
        """Seconds the window's counts stand for: its length, or less while it is young."""
        if self.started is None:
            return 0.0
        return max(min(self.length, now - self.started), 1e-3)

    def idle(self, now: float) -> bool:
        return now - self.last_add > self.length


@dataclass(frozen=True, slots=True)
class SeenDenial:
    service: str  # whose sidecar refused
    node: str
    denial: Denial

    def view(self) -> dict[str, Any]:
        d = self.denial
        return {"service": self.service, "node": self.node, "at": d.at, "reason": d.reason,
                "flag": d.flag, "status": d.status, "source": d.source, "method": d.method,
                "path": d.path}


def row(counts: Counts, covered: float) -> dict[str, Any]:
    """One line of `pakectl top` / the dashboard: rates, success, latency quantiles (seconds)."""
    return {
        "requests": counts.requests,
        "rps": counts.requests / covered if covered else 0.0,
        "errors": counts.errors,
        "success_rate": None if not counts.requests else 1 - counts.errors / counts.requests,
        "p50": counts.quantile(0.50), "p95": counts.quantile(0.95), "p99": counts.quantile(0.99),
        "breaker_opens": counts.breaker_opens,
    }


def _breaker_summary(states: Iterable[str]) -> str:
    """One word for a destination's breakers across the sidecars that call it."""
    seen = list(states)
    if not seen:
        return "-"
    opened = sum(1 for s in seen if s == "open")
    half = sum(1 for s in seen if s == "half_open")
    if opened:
        return "open" if opened == len(seen) else f"open {opened}/{len(seen)}"
    if half:
        return "half_open"
    return "closed"


class MeshStats:
    """What every sidecar reported, summed per destination service, edge and route."""

    def __init__(self, window: float = DEFAULT_WINDOW, *, max_keys: int = 10_000,
                 max_denials: int = 100) -> None:
        self.window = window
        self.max_keys = max_keys
        self.services: dict[str, Window] = {}
        self.edges: dict[tuple[str, str], Window] = {}
        self.routes: dict[tuple[str, str, str], Window] = {}  # (source, route, destination)
        self.slo_windows: dict[str, Window] = {}
        self.objectives: dict[str, SloConfig] = {}
        # (source, node, destination) -> (breaker state, when reported)
        self.breakers: dict[tuple[str, str, str], tuple[str, float]] = {}
        self.denials: deque[SeenDenial] = deque(maxlen=max_denials)
        self.messages = 0
        self.denials_seen = 0
        self.denials_dropped = 0  # sidecars' own overflow plus none here (the deque evicts)
        self.keys_dropped = 0

    def set_objectives(self, objectives: Mapping[str, SloConfig], now: float) -> None:
        """A new config's SLOs: a service keeps its SLO window while its length is unchanged.
        A new SLO window starts with what the live window holds: the objectives are read a
        moment after an apply, and the traffic of that moment must count too."""
        for name in list(self.slo_windows):
            old = self.objectives.get(name)
            new = objectives.get(name)
            if new is None or old is None or old.window != new.window:
                del self.slo_windows[name]
        for name, slo in objectives.items():
            if name not in self.slo_windows:
                w = self.slo_windows[name] = Window(slo.window, SLO_SLOTS)
                live = self.services.get(name)
                if live is not None and live.started is not None:
                    w.seed(now, live.total(now), min(live.covered(now), slo.window))
        self.objectives = dict(objectives)

    def _window(self, table: dict[Any, Window], key: Any, length: float) -> Window | None:
        w = table.get(key)
        if w is None:
            if len(self.services) + len(self.edges) + len(self.routes) >= self.max_keys:
                self.keys_dropped += 1
                return None
            w = table[key] = Window(length)
        return w

    def record(self, source: str, node: str, stats: Stats, now: float) -> None:
        """Add one sidecar's stats message (``source``: its service)."""
        self.messages += 1
        for r in stats.routes:
            for table, key in ((self.services, r.destination),
                               (self.edges, (source, r.destination)),
                               (self.routes, (source, r.route, r.destination))):
                w = self._window(table, key, self.window)
                if w is not None:
                    w.add(now, r, stats.interval)
            slo = self.slo_windows.get(r.destination)
            if slo is not None:
                slo.add(now, r, stats.interval)
            bkey = (source, node, r.destination)
            if bkey in self.breakers or len(self.breakers) < self.max_keys:
                self.breakers[bkey] = (r.breaker, now)
        for d in stats.denials:
            self.denials.append(SeenDenial(source, node, d))
        self.denials_seen += len(stats.denials) + stats.denials_dropped
        self.denials_dropped += stats.denials_dropped

    def prune(self, now: float) -> None:
        """Forget keys with nothing in their window, and breaker reports as old."""
        for table in (self.services, self.edges, self.routes):
            for key in [k for k, w in table.items() if w.idle(now)]:
                del table[key]
        for key in [k for k, (_, at) in self.breakers.items() if now - at > self.window]:
            del self.breakers[key]

    def breaker_state(self, destination: str, source: str | None = None) -> str:
        return _breaker_summary(state for (src, _, dst), (state, _) in self.breakers.items()
                                if dst == destination and (source is None or src == source))

    def slo_counts(self, service: str, now: float) -> tuple[Counts, float] | None:
        w = self.slo_windows.get(service)
        return None if w is None else (w.total(now), w.covered(now))

    def sample(self, now: float) -> dict[str, Any]:
        """Everything `pakectl top` and the dashboard show, as JSON-able data."""
        self.prune(now)
        services = []
        for name, w in sorted(self.services.items()):
            services.append({"service": name, **row(w.total(now), w.covered(now)),
                             "breaker": self.breaker_state(name)})
        edges = []
        for (src, dst), w in sorted(self.edges.items()):
            edges.append({"source": src, "destination": dst, **row(w.total(now), w.covered(now)),
                          "breaker": self.breaker_state(dst, src)})
        routes = []
        for (src, route, dst), w in sorted(self.routes.items()):
            routes.append({"source": src, "route": route, "destination": dst,
                           **row(w.total(now), w.covered(now)),
                           "breaker": self.breaker_state(dst, src)})
        return {"window": self.window, "services": services, "edges": edges, "routes": routes,
                "denials": [d.view() for d in reversed(self.denials)],
                "denials_seen": self.denials_seen}
