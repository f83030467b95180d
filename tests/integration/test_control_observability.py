"""Seeing the mesh from the control plane, in-process on port 0 with sidecar-like clients over
real mTLS: stats messages summed per service, edge and route; SLOs judged and flagged on
/metrics; `pakectl top`; traces from a real OpenTelemetry SDK exporter over OTLP/HTTP into the
control plane's collector, read back with their parent/child links."""

from __future__ import annotations

import asyncio
import gzip
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from control.server import ControlPlane, ServeOptions
from sidecar.discovery.protocol import LATENCY_BUCKETS, Denial, RouteStats, Stats
from tests.helpers.control_process import run_pakectl
from tests.helpers.mesh_client import MeshClient

MakePlane = Callable[..., Awaitable[ControlPlane]]

MESH: dict[str, Any] = {
    "services": {
        "orders": {"policy": {"default": "deny", "rules": [{"allow": {"from": ["frontend"]}}]},
                   "slo": {"window": "1m", "availability": "99%", "p95": "100ms",
                           "min_requests": 10}},
        "frontend": {"routes": [{"name": "to-orders", "to": [{"service": "orders"}]}]},
        "gateway": {"routes": [{"name": "api", "to": [{"service": "frontend"}]}]},
    }
}


@pytest.fixture
async def make_plane(tmp_path: Path) -> AsyncIterator[MakePlane]:
    planes: list[ControlPlane] = []

    async def make(**options: Any) -> ControlPlane:
        opts = ServeOptions(state_dir=tmp_path / "state", listen=("127.0.0.1", 0),
                            admin=("127.0.0.1", 0), **options)
        plane = await ControlPlane.open(opts)
        await plane.start()
        planes.append(plane)
        return plane

    yield make
    for plane in planes:
        await plane.stop()


async def admin(plane: ControlPlane, path: str, method: str = "GET", body: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.request(method, f"http://127.0.0.1:{plane.ports['admin']}{path}",
                                json=body) as r:
            if r.content_type == "application/json":
                return r.status, await r.json()
            return r.status, await r.text()


async def joined(plane: ControlPlane, tmp_path: Path, service: str, node: str = "node-1") -> MeshClient:
    status, body = await admin(plane, "/v1/tokens", "POST", {"service": service})
    assert status == 200, body
    client = MeshClient(tmp_path, f"127.0.0.1:{plane.ports['listen']}", service=service, node=node)
    await client.join(body["token"])
    await client.connect()
    return client


def histogram(**by_bound: int) -> tuple[int, ...]:
    """Latency counts by bucket bound in ms, e.g. histogram(ms5=10, ms100=1)."""
    counts = [0] * (len(LATENCY_BUCKETS) + 1)
    for key, n in by_bound.items():
        counts[LATENCY_BUCKETS.index(float(key.removeprefix("ms")) / 1000)] += n
    return tuple(counts)


async def send_stats(plane: ControlPlane, client: MeshClient, message: Stats) -> None:
    before = plane.observability.stats.messages
    await client.send(message)
    await plane.streams.wait_until(lambda: plane.observability.stats.messages > before, 5)


async def test_stats_are_summed_per_service_edge_and_route(make_plane: MakePlane, tmp_path: Path) -> None:
    plane = await make_plane()
    await admin(plane, "/v1/config", "POST", {"mesh": MESH})
    frontend = await joined(plane, tmp_path, "frontend")
    gateway = await joined(plane, tmp_path, "gateway")
    orders = await joined(plane, tmp_path, "orders")
    await send_stats(plane, frontend, Stats(interval=5.0, routes=(
        RouteStats(route="to-orders", destination="orders", requests=90, errors=0,
                   latency=histogram(ms5=90)),)))
    await send_stats(plane, gateway, Stats(interval=5.0, routes=(
        RouteStats(route="api", destination="frontend", requests=10, errors=5,
                   latency=histogram(ms50=10), breaker_opens=1, breaker="open"),)))
    await send_stats(plane, orders, Stats(interval=5.0, denials=(
        Denial(at=1_700_000_000.0, reason="no rule allows spiffe://pake.local/service/gateway",
               source="spiffe://pake.local/service/gateway", method="POST", path="/orders"),)))

    status, sample = await admin(plane, "/api/stats")
    assert status == 200
    services = {s["service"]: s for s in sample["services"]}
    assert services["orders"]["requests"] == 90
    assert services["orders"]["success_rate"] == 1.0
    assert 0.0025 < services["orders"]["p99"] <= 0.005  # inside the 5 ms bucket
    assert services["frontend"]["success_rate"] == 0.5
    assert services["frontend"]["breaker"] == "open"
    edges = {(e["source"], e["destination"]): e for e in sample["edges"]}
    assert set(edges) == {("frontend", "orders"), ("gateway", "frontend")}
    # 90 requests over the 5 s the message covers, plus the moments since: at most 18/s
    assert 5.0 < edges[("frontend", "orders")]["rps"] <= 90 / 5.0
    assert {(r["source"], r["route"], r["destination"]) for r in sample["routes"]} == {
        ("frontend", "to-orders", "orders"), ("gateway", "api", "frontend")}
    [denial] = sample["denials"]
    assert denial["service"] == "orders" and denial["reason"].startswith("no rule allows")
    # orders' SLO: 90 good requests at ~5 ms: within 99% and p95 < 100 ms
    [slo] = sample["slo"]
    assert slo["service"] == "orders" and slo["state"] == "ok"
    assert slo["budget_remaining"] == 1.0
    for client in (frontend, gateway, orders):
        await client.close()


def metric_value(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


async def test_a_service_out_of_its_objective_is_flagged(make_plane: MakePlane, tmp_path: Path) -> None:
    plane = await make_plane()
    await admin(plane, "/v1/config", "POST", {"mesh": MESH})
    frontend = await joined(plane, tmp_path, "frontend")
    await send_stats(plane, frontend, Stats(interval=2.0, routes=(
        RouteStats(route="to-orders", destination="orders", requests=100, errors=4,
                   latency=histogram(ms5=80, ms250=20)),)))
    await plane.observability.refresh_objectives()
    _, text = await admin(plane, "/metrics")
    assert metric_value(text, "pake_control_slo_violated", service="orders") == 1.0
    # 4% errors against a 1% budget: the budget is overspent three times over
    assert metric_value(text, "pake_control_slo_error_budget_remaining",
                        service="orders") == pytest.approx(-3.0)
    assert metric_value(text, "pake_control_slo_objective_met", service="orders",
                        objective="availability") == 0.0
    assert metric_value(text, "pake_control_slo_objective_met", service="orders",
                        objective="p95") == 0.0  # p95 falls in the 250 ms bucket
    assert metric_value(text, "pake_control_stats_messages_total") == 1.0

    admin_address = f"127.0.0.1:{plane.ports['admin']}"
    result = await run_pakectl("top", "--json", "--admin", admin_address)
    assert result.code == 0, result.stderr
    [slo] = json.loads(result.stdout)["slo"]
    assert slo["state"] == "violated"
    result = await run_pakectl("top", "--count", "1", "--admin", admin_address)
    assert result.code == 0, result.stderr
    [row] = [line for line in result.stdout.splitlines() if line.startswith("orders")]
    assert re.search(r"orders\s+\d+\.\d\s+96\.00%\s+4\.\dms\s+2\d\dms", row), row
    assert "VIOLATED (availability, p95)" in row and "-300%" in row
    await frontend.close()


# === traces ===


def export_spans(endpoint: str, compression: str | None = None) -> str:
    """A SERVER span with two CLIENT attempts under it, exported by the real SDK exporter
    (blocking, so the test runs this in a thread); returns the trace id."""
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.trace import SpanKind

    exporter = OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces", timeout=5,
                                compression=Compression.Gzip if compression else None)
    provider = TracerProvider(resource=Resource.create({"service.name": "frontend"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("GET /orders", kind=SpanKind.SERVER) as root:
        root.set_attribute("http.request.method", "GET")
        for attempt in (1, 2):
            with tracer.start_as_current_span("upstream_request", kind=SpanKind.CLIENT) as span:
                span.set_attribute("pake.attempt", attempt)
        trace_id = format(root.get_span_context().trace_id, "032x")
    provider.shutdown()
    return trace_id


@pytest.mark.parametrize("compression", [None, "gzip"])
async def test_sdk_traces_are_kept_with_their_links(make_plane: MakePlane, compression: str | None) -> None:
    plane = await make_plane(otlp=("127.0.0.1", 0))
    endpoint = f"http://127.0.0.1:{plane.ports['otlp']}"
    trace_id = await asyncio.to_thread(export_spans, endpoint, compression)

    status, listing = await admin(plane, "/api/traces")
    assert status == 200
    [summary] = listing["traces"]
    assert summary["trace_id"] == trace_id and summary["spans"] == 3
    assert summary["root"] == "GET /orders" and summary["services"] == ["frontend"]
    status, trace = await admin(plane, f"/api/traces/{trace_id}")
    assert status == 200
    root, first, second = trace["spans"]
    assert root["kind"] == "SERVER" and root["parent_span_id"] is None and root["depth"] == 0
    assert {first["kind"], second["kind"]} == {"CLIENT"}
    assert first["parent_span_id"] == second["parent_span_id"] == root["span_id"]
    assert root["children"] == [first["span_id"], second["span_id"]]
    assert [first["attributes"]["pake.attempt"], second["attributes"]["pake.attempt"]] == [1, 2]
    assert root["attributes"]["http.request.method"] == "GET"
    status, _ = await admin(plane, "/api/traces/" + "0" * 32)
    assert status == 404


async def test_otlp_json_bodies_and_refusals(make_plane: MakePlane) -> None:
    plane = await make_plane(otlp=("127.0.0.1", 0))
    url = f"http://127.0.0.1:{plane.ports['otlp']}/v1/traces"
    trace_id, span_id = "5b8efff798038103d269b633813fc60c", "eee19b7ec3c1b174"
    body = {"resourceSpans": [{"resource": {"attributes": [
        {"key": "service.name", "value": {"stringValue": "gateway"}}]},
        "scopeSpans": [{"spans": [{"traceId": trace_id, "spanId": span_id, "name": "POST /login",
                                   "kind": 2, "startTimeUnixNano": "1700000000000000000",
                                   "endTimeUnixNano": "1700000000250000000"}]}]}]}
    async with aiohttp.ClientSession() as http:
        async with http.post(url, json=body) as r:
            assert r.status == 200 and await r.json() == {}
        async with http.post(url, data=b"\xff\x00garbage",
                             headers={"Content-Type": "application/x-protobuf"}) as r:
            assert r.status == 400
            assert b"not an ExportTraceServiceRequest protobuf" in await r.read()
        async with http.post(url, data=b'{"resourceSpans": [{"scopeSpans": [{"spans": '
                                        b'[{"traceId": "zz"}]}]}]}',
                             headers={"Content-Type": "application/json"}) as r:
            assert r.status == 400 and "traceId: not a hex id" in (await r.json())["message"]
        async with http.post(url, data=b"x", headers={"Content-Type": "text/plain"}) as r:
            assert r.status == 415
        # the bound holds after decompression: 5 MiB of zeros gzip to a few KiB
        bomb = gzip.compress(b"\x00" * (5 * 1024 * 1024))
        async with http.post(url, data=bomb, headers={"Content-Type": "application/x-protobuf",
                                                      "Content-Encoding": "gzip"}) as r:
            assert r.status == 413
    status, trace = await admin(plane, f"/api/traces/{trace_id}")
    assert status == 200
    [span] = trace["spans"]
    assert span["service"] == "gateway" and span["duration_ms"] == pytest.approx(250.0)
    _, text = await admin(plane, "/metrics")
    assert metric_value(text, "pake_control_otlp_requests_total", result="accepted") == 1.0
    assert metric_value(text, "pake_control_otlp_requests_total", result="bad_request") == 2.0
    assert metric_value(text, "pake_control_otlp_requests_total", result="too_large") == 1.0


async def test_event_streams_carry_state_and_end_when_the_plane_stops(tmp_path: Path) -> None:
    opts = ServeOptions(state_dir=tmp_path / "state", listen=("127.0.0.1", 0), admin=("127.0.0.1", 0))
    plane = await ControlPlane.open(opts)
    await plane.start()
    stopped = False
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{plane.ports['admin']}/api/events") as r:
                assert r.headers["Content-Type"] == "text/event-stream"
                assert await r.content.readline() == b"event: state\n"
                state = json.loads((await r.content.readline()).removeprefix(b"data: "))
                assert {"nodes", "edges", "sidecars", "denials", "traces", "slo"} <= set(state)
                # an open dashboard does not hold the shutdown up (aiohttp would wait 60 s)
                async with asyncio.timeout(5):
                    await plane.stop()
                    stopped = True
                    while await r.content.readline():
                        pass
    finally:
        if not stopped:
            await plane.stop()
