"""Seeing the mesh from the control plane: the sidecars' stats, SLOs, traces, ``/metrics``
and the dashboard, on the admin port.

Routes (added to the admin app, behind its auth): ``GET /metrics`` (Prometheus),
``/api/stats`` (what `pakectl top` shows), ``/api/traces`` and ``/api/traces/{trace_id}``,
``/api/dashboard`` (the dashboard's whole state), ``/api/events`` (that state as server-sent
events, once per refresh), ``/dashboard`` (the page; ``/`` redirects there).

One task (``run``) refreshes once a period: it re-reads the SLOs when the applied config
changed, computes the state once and wakes the event streams, so N browsers cost one
computation. Event streams are bounded in number and each send has a deadline.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from control.collector import CollectorLimits, OtlpReceiver, TraceStore
from control.config import ConfigService
from control.registry import Registry
from control.slo import SloStatus, evaluate, objectives_of
from control.stats import DEFAULT_WINDOW, MeshStats
from control.store import StoreError
from control.stream import SidecarSession, StreamService
from sidecar.discovery.protocol import Stats

__all__ = ["Observability"]

log = structlog.get_logger("pake.control.observability")

DASHBOARD_DIR = Path(__file__).parent / "dashboard"
MAX_EVENT_STREAMS = 32
EVENT_SEND_TIMEOUT = 5.0
RECENT_TRACES = 20


class Observability:
    def __init__(self, *, config: ConfigService, streams: StreamService, registry: Registry,
                 window: float = DEFAULT_WINDOW, refresh: float = 1.0,
                 limits: CollectorLimits = CollectorLimits(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.streams = streams
        self.registry = registry
        self.refresh_period = refresh
        self.clock = clock
        self.stats = MeshStats(window)
        self.traces = TraceStore(limits)
        self.receiver = OtlpReceiver(self.traces)
        self.metrics = CollectorRegistry(auto_describe=True)
        self.metrics.register(_ControlCollector(self))
        self.config_version: int | None = None
        self.config_services: frozenset[str] = frozenset()  # the graph's nodes, with traffic
        self._config_read = False
        self._state: dict[str, Any] = {}
        self._tick = asyncio.Event()
        self._event_streams = 0
        self.closing = False

    # === inputs ===

    def on_stats(self, session: SidecarSession, message: Stats) -> None:
        self.stats.record(session.service, session.node, message, self.clock())

    async def refresh_objectives(self) -> None:
        """Re-read the SLOs when the applied config changed (a store read, a parse if new)."""
        try:
            current = await self.config.current()
        except StoreError as exc:
            log.warning("slo_refresh_failed", error=str(exc))
            return
        version = None if current is None else current.version
        if self._config_read and version == self.config_version:
            return
        self.stats.set_objectives({} if current is None else objectives_of(current.mesh),
                                 self.clock())
        self.config_version = version
        services = {} if current is None else current.mesh.get("services") or {}
        self.config_services = frozenset(str(name) for name in services)
        self._config_read = True

    # === views ===

    def slo(self, now: float) -> list[SloStatus]:
        out = []
        for name, objective in sorted(self.stats.objectives.items()):
            counts = self.stats.slo_counts(name, now)
            if counts is not None:
                out.append(evaluate(name, objective, *counts))
        return out

    def sample(self) -> dict[str, Any]:
        """One sample of the mesh's traffic and SLOs (`pakectl top`, ``/api/stats``)."""
        now = self.clock()
        return {**self.stats.sample(now), "slo": [s.view() for s in self.slo(now)],
                "config_version": self.config_version,
                "at": datetime.now(UTC).isoformat(timespec="seconds")}

    def _sidecars(self) -> list[dict[str, Any]]:
        sidecars = [s.status() for s in self.streams.sessions.values()]
        connected = {(s["service"], s["node"]) for s in sidecars}
        for reg in self.registry.registrations():
            if (reg.service, reg.node) not in connected:
                sidecars.append({"service": reg.service, "node": reg.node, "address": reg.address,
                                 "connected": False, "state": "disconnected",
                                 "app_healthy": reg.app_healthy, "held_version": None,
                                 "latest_version": None, "cert_expiry": None})
        for s in sidecars:
            s["breakers"] = {dst: state for (src, node, dst), (state, _) in
                             self.stats.breakers.items() if (src, node) == (s["service"], s["node"])}
        return sorted(sidecars, key=lambda s: (s["service"], s["node"]))

    def dashboard_state(self) -> dict[str, Any]:
        sample = self.sample()
        sidecars = self._sidecars()
        by_name: dict[str, dict[str, Any]] = {}
        names = {s["service"] for s in sidecars} | {r["service"] for r in sample["services"]} | \
            {e["source"] for e in sample["edges"]} | self.config_services
        traffic = {r["service"]: r for r in sample["services"]}
        slo = {s["service"]: s for s in sample["slo"]}
        for name in sorted(names):
            mine = [s for s in sidecars if s["service"] == name]
            by_name[name] = {"service": name, "sidecars": len(mine),
                             "healthy": sum(1 for s in mine if s["connected"] and s["app_healthy"]),
                             "traffic": traffic.get(name), "slo": slo.get(name)}
        recent = self.traces.summaries(RECENT_TRACES)
        latest = self.traces.get(recent[0]["trace_id"]) if recent else None
        return {**sample, "nodes": list(by_name.values()), "sidecars": sidecars,
                "traces": recent, "latest_trace": latest}

    # === the refresh task ===

    async def run(self) -> None:
        """Until cancelled (the control plane stopping); then the event streams end too, so
        an open dashboard does not hold the shutdown up."""
        try:
            while True:
                await self.refresh_objectives()
                self._state = self.dashboard_state()
                tick, self._tick = self._tick, asyncio.Event()
                tick.set()
                await asyncio.sleep(self.refresh_period)
        finally:
            self.closing = True
            self._tick.set()

    # === HTTP ===

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/metrics", self.get_metrics)
        app.router.add_get("/api/stats", self.get_stats)
        app.router.add_get("/api/traces", self.get_traces)
        app.router.add_get("/api/traces/{trace_id}", self.get_trace)
        app.router.add_get("/api/dashboard", self.get_dashboard)
        app.router.add_get("/api/events", self.events)
        app.router.add_get("/", self.to_dashboard)
        app.router.add_get("/dashboard", self.page)
        app.router.add_static("/dashboard/", DASHBOARD_DIR, show_index=False, follow_symlinks=False)

    async def get_metrics(self, request: web.Request) -> web.Response:
        await self.refresh_objectives()
        return web.Response(body=generate_latest(self.metrics),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def get_stats(self, request: web.Request) -> web.Response:
        await self.refresh_objectives()
        return web.json_response(self.sample())

    async def get_traces(self, request: web.Request) -> web.Response:
        try:
            limit = max(1, min(int(request.query.get("limit", "50")), 1000))
        except ValueError:
            return web.json_response({"error": "bad_request", "detail": "limit must be a number"},
                                     status=400)
        return web.json_response({"traces": self.traces.summaries(limit),
                                  "stored": len(self.traces)})

    async def get_trace(self, request: web.Request) -> web.Response:
        trace = self.traces.get(request.match_info["trace_id"])
        if trace is None:
            return web.json_response({"error": "no_trace",
                                      "detail": "no such trace (or it was evicted: the store keeps "
                                                "the most recent ones)"}, status=404)
        return web.json_response(trace)

    async def get_dashboard(self, request: web.Request) -> web.Response:
        await self.refresh_objectives()
        return web.json_response(self.dashboard_state())

    async def to_dashboard(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/dashboard")

    async def page(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(DASHBOARD_DIR / "index.html")

    async def events(self, request: web.Request) -> web.StreamResponse:
        """The dashboard's state as server-sent events, one per refresh."""
        if self._event_streams >= MAX_EVENT_STREAMS:
            return web.json_response({"error": "too_many_streams",
                                      "detail": f"at most {MAX_EVENT_STREAMS} dashboards at once"},
                                     status=503)
        self._event_streams += 1
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        try:
            await response.prepare(request)
            state = self._state or self.dashboard_state()
            while not self.closing:
                data = json.dumps(state, separators=(",", ":"))
                async with asyncio.timeout(EVENT_SEND_TIMEOUT):
                    await response.write(f"event: state\ndata: {data}\n\n".encode())
                await self._tick.wait()
                state = self._state
            await response.write_eof()
        except (ConnectionError, TimeoutError):
            return response  # the browser went away or stopped reading
        finally:
            self._event_streams -= 1


class _ControlCollector(Collector):
    """The control plane's metrics, read from its state at each scrape."""

    def __init__(self, obs: Observability) -> None:
        self._obs = obs

    def collect(self) -> Iterator[Metric]:
        obs = self._obs
        streams = GaugeMetricFamily("pake_control_streams", "Connected sidecar streams")
        streams.add_metric([], len(obs.streams.sessions))
        yield streams
        yield CounterMetricFamily("pake_control_stats_messages", "Stats messages received from sidecars",
                                  value=obs.stats.messages)
        yield CounterMetricFamily("pake_control_stats_keys_dropped",
                                  "Stats entries dropped: the control plane tracks at most max_keys "
                                  "services, edges and routes", value=obs.stats.keys_dropped)
        yield CounterMetricFamily("pake_control_denials", "Denials the sidecars reported",
                                  value=obs.stats.denials_seen)
        now = obs.clock()
        statuses = obs.slo(now)
        violated = GaugeMetricFamily("pake_control_slo_violated",
                                     "1 when the service is out of one of its objectives over its "
                                     "SLO window, else 0 (also 0 without enough requests)",
                                     labels=["service"])
        budget = GaugeMetricFamily("pake_control_slo_error_budget_remaining",
                                   "Share of the error budget left over the SLO window (negative: "
                                   "overspent); absent without data", labels=["service"])
        met = GaugeMetricFamily("pake_control_slo_objective_met",
                                "1 when the objective holds over the SLO window, 0 when not; "
                                "absent without enough requests",
                                labels=["service", "objective"])
        for s in statuses:
            violated.add_metric([s.service], 1.0 if s.violated else 0.0)
            if s.budget_remaining is not None:
                budget.add_metric([s.service], s.budget_remaining)
            for o in s.objectives:
                if o.ok is not None:
                    met.add_metric([s.service, o.name], 1.0 if o.ok else 0.0)
        yield violated
        yield budget
        yield met
        requests = CounterMetricFamily("pake_control_otlp_requests",
                                       "OTLP/HTTP export requests, by result", labels=["result"])
        for result, count in sorted(obs.receiver.requests.items()):
            requests.add_metric([result], count)
        yield requests
        yield CounterMetricFamily("pake_control_otlp_spans", "Spans received over OTLP/HTTP",
                                  value=obs.traces.spans_received)
        yield CounterMetricFamily("pake_control_otlp_spans_dropped",
                                  "Spans dropped: their trace already held max_spans_per_trace",
                                  value=obs.traces.spans_dropped)
        yield GaugeMetricFamily("pake_control_traces", "Traces held in the trace store",
                                value=len(obs.traces))
        yield GaugeMetricFamily("pake_control_traces_bytes",
                                "Size of the spans held in the trace store (protobuf bytes)",
                                value=obs.traces.size)
        yield CounterMetricFamily("pake_control_traces_evicted",
                                  "Traces evicted to stay within the store's count and byte bounds",
                                  value=obs.traces.traces_evicted)

