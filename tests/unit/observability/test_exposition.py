"""The sidecar's own exposition renders what prometheus-client renders for the same metrics,
so a scraper, a dashboard or a test that parses /metrics cannot tell them apart."""

from __future__ import annotations

import re
from bisect import bisect_left

import prometheus_client
import pytest
from prometheus_client import core
from prometheus_client.parser import text_string_to_metric_families

from sidecar.config.model import RouteConfig, RouteMatch
from sidecar.exchange import Exchange
from sidecar.http.message import RequestHead
from sidecar.observability import exposition as ours
from sidecar.observability.metrics import _LATENCY_BUCKETS, Metrics, latency_bucket

_CREATED = re.compile(rb"(_created(?:\{[^}]*\})?) [0-9.e+]+\n")


def _families(mod_core: object, mod_registry: object) -> list[object]:
    """The same collected families built with either module's classes."""
    c = mod_core
    requests = c.CounterMetricFamily("pake_requests", "Requests by \\ route\nand class",  # type: ignore[attr-defined]
                                     labels=["listener", "route"])
    requests.add_metric(["inbound", 'a "quoted" \\ route\n'], 3)
    requests.add_metric(["outbound", "r"], 12345678901.0)
    gauge = c.GaugeMetricFamily("pake_queue", "Queued", value=0.25)  # type: ignore[attr-defined]
    empty = c.CounterMetricFamily("pake_nothing_total", "No samples yet", labels=["x"])  # type: ignore[attr-defined]
    total = c.CounterMetricFamily("pake_failures", "One value", value=7)  # type: ignore[attr-defined]
    hist = c.HistogramMetricFamily("pake_duration_seconds", "Latency", labels=["cluster"])  # type: ignore[attr-defined]
    hist.add_metric(["local-app"], [("0.005", 1.0), ("0.1", 4.0), ("+Inf", 5.0)], 0.75)
    return [requests, gauge, empty, total, hist]


def _render_prometheus(families: list[object]) -> bytes:
    class Fixed:
        def collect(self) -> list[object]:
            return families

    registry = prometheus_client.CollectorRegistry()
    registry.register(Fixed())  # type: ignore[arg-type]
    return prometheus_client.generate_latest(registry)


def _render_ours(families: list[object]) -> bytes:
    class Fixed:
        def collect(self) -> list[object]:
            return families

    registry = ours.CollectorRegistry()
    registry.register(Fixed())
    return ours.generate_latest(registry)


def test_families_render_byte_for_byte_as_prometheus_client_renders_them() -> None:
    assert _render_ours(_families(ours, ours)) == _render_prometheus(_families(core, prometheus_client))


def test_labelled_counters_and_gauges_render_as_prometheus_client_s_do() -> None:
    def build(mod: object) -> bytes:
        registry = mod.CollectorRegistry()  # type: ignore[attr-defined]
        refused = mod.Counter("pake_refused_total", "Refused", ["listener"], registry=registry)  # type: ignore[attr-defined]
        refused.labels("outbound").inc()
        refused.labels("inbound").inc(2)
        mod.Counter("pake_unused_total", "Never incremented", ["cluster"], registry=registry)  # type: ignore[attr-defined]
        expiry = mod.Gauge("pake_expiry_seconds", "Seconds left", registry=registry)  # type: ignore[attr-defined]
        expiry.set_function(lambda: 86399.5)
        active = mod.Gauge("pake_active", "Open", ["listener"], registry=registry)  # type: ignore[attr-defined]
        active.labels("inbound").set(4)
        render = ours.generate_latest if mod is ours else prometheus_client.generate_latest
        return _CREATED.sub(rb"\1 T\n", render(registry))

    assert build(ours) == build(prometheus_client)


def test_a_name_is_registered_once() -> None:
    registry = ours.CollectorRegistry()
    ours.Counter("pake_x_total", "x", ["a"], registry=registry)
    with pytest.raises(ValueError, match="pake_x"):
        ours.Counter("pake_x", "again", ["a"], registry=registry)


def test_our_counter_is_read_by_a_prometheus_client_registry() -> None:
    """Tests hand the TLS metrics a prometheus-client registry and read it back."""
    registry = prometheus_client.CollectorRegistry()
    failures = ours.Counter("pake_fail_total", "Failures", ["side"], registry=registry)  # type: ignore[arg-type]
    failures.labels("server").inc()
    assert registry.get_sample_value("pake_fail_total", {"side": "server"}) == 1.0


def test_the_sidecar_metrics_parse_as_prometheus_text() -> None:
    metrics = Metrics()
    for status, flags, seconds in ((200, "-", 0.003), (503, "UF", 0.2)):
        head = RequestHead("GET", b"/", "/", "orders", "orders", "1.1", [])
        ex = Exchange(request=head, listener="inbound", downstream_address="127.0.0.1",
                      request_id="r", start=0.0, cluster="local-app", status=status, flags=flags)
        metrics.exchange_done(ex, seconds)
    metrics.connections_refused.labels("inbound", "max_connections").inc()
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    assert families["pake_requests"].type == "counter"
    assert {s.labels["status_class"]: s.value for s in families["pake_requests"].samples} == {
        "2xx": 1.0, "5xx": 1.0}
    hist = families["pake_request_duration_seconds"]
    assert hist.type == "histogram"
    count = next(s.value for s in hist.samples if s.name.endswith("_count"))
    assert count == 2.0
    refused = families["pake_downstream_connections_refused"].samples
    assert [s.value for s in refused if s.name.endswith("_total")] == [1.0]


def test_an_exchange_lands_in_the_latency_bucket_bisect_gives() -> None:
    # every bound, just under and just over it, zero, negative and past the last: the
    # histogram's ``le`` buckets as prometheus defines them (a value equal to a bound is in it)
    values = [0.0, -1.0, 1e-9, 100.0, float("inf")]
    for bound in _LATENCY_BUCKETS:
        values += [bound, bound * 0.999, bound * 1.001]
    for seconds in values:
        assert latency_bucket(seconds) == bisect_left(_LATENCY_BUCKETS, seconds), seconds


def test_exchanges_count_in_their_own_series_whether_their_names_are_the_same_objects_or_equal() -> None:
    """The collector remembers the last series by the identity of its names: equal names
    built afresh, and alternating series, still count where they belong."""
    metrics = Metrics()
    route = RouteConfig(name="reads", match=RouteMatch(), to=())
    for i in range(6):
        head = RequestHead("GET", b"/", "/", "orders", "orders", "1.1", [])
        cluster = "".join(["orders", "-v1"]) if i % 3 else "orders-v1"  # equal, not always the same object
        ex = Exchange(request=head, listener="inbound", downstream_address="127.0.0.1", request_id="r",
                      start=0.0, cluster=cluster if i % 2 else "payments", status=200,
                      route=route if i < 4 else None)
        metrics.exchange_done(ex, 0.001)
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    counts = {(s.labels["route"], s.labels["cluster"]): s.value for s in families["pake_requests"].samples}
    assert counts == {("reads", "payments"): 2.0, ("reads", "orders-v1"): 2.0, ("-", "payments"): 1.0,
                      ("-", "orders-v1"): 1.0}
