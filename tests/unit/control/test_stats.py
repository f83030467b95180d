"""Mesh stats: histogram quantiles, the sliding window, the key bound, SLO windows and their
verdicts. Pure: time is passed in."""

from __future__ import annotations

import pytest

from control.slo import evaluate, objectives_of
from control.stats import N_BUCKETS, Counts, MeshStats, Window, quantile
from sidecar.config.slo import SloConfig
from sidecar.discovery.protocol import LATENCY_BUCKETS, Denial, RouteStats, Stats


def hist(**by_ms: int) -> tuple[int, ...]:
    counts = [0] * N_BUCKETS
    for key, n in by_ms.items():
        counts[LATENCY_BUCKETS.index(float(key.removeprefix("ms")) / 1000)] += n
    return tuple(counts)


def route(dst: str = "orders", requests: int = 10, errors: int = 0, **kw: object) -> RouteStats:
    return RouteStats(route="r", destination=dst, requests=requests, errors=errors, **kw)  # type: ignore[arg-type]


def test_quantiles_interpolate_inside_their_bucket() -> None:
    counts = list(hist(ms10=50, ms100=50))
    assert quantile(counts, 0.5) == pytest.approx(0.01)  # the top of the 5-10 ms bucket
    assert quantile(counts, 0.75) == pytest.approx(0.05 + 0.05 * 0.5)  # halfway in 50-100 ms
    assert quantile([0] * N_BUCKETS, 0.5) is None
    slow = [0] * N_BUCKETS
    slow[-1] = 3
    assert quantile(slow, 0.99) == LATENCY_BUCKETS[-1]  # "at least 30 s"


def test_the_window_forgets_what_slid_out() -> None:
    w = Window(60.0, slots=12)
    w.add(1000.0, route(requests=10), interval=5.0)
    w.add(1030.0, route(requests=20), interval=5.0)
    assert w.total(1030.0).requests == 30
    assert w.covered(1030.0) == pytest.approx(35.0)
    assert w.total(1061.0).requests == 20  # the first slot has left the window
    assert w.total(1100.0).requests == 0
    assert w.covered(1100.0) == 60.0


def test_per_service_edge_route_and_breakers() -> None:
    stats = MeshStats(60.0)
    stats.record("frontend", "n1", Stats(interval=5.0, routes=(
        route(requests=10, errors=1, breaker="open", breaker_opens=1, latency=hist(ms5=10)),)), 1000.0)
    stats.record("frontend", "n2", Stats(interval=5.0, routes=(route(requests=10),)), 1000.0)
    stats.record("gateway", "g1", Stats(interval=5.0, routes=(route(requests=20),)), 1000.0)
    sample = stats.sample(1000.0)
    [orders] = sample["services"]
    assert (orders["requests"], orders["errors"]) == (40, 1)
    assert orders["rps"] == pytest.approx(8.0)
    assert orders["breaker"] == "open 1/3"
    edges = {(e["source"], e["destination"]): e for e in sample["edges"]}
    assert edges[("frontend", "orders")]["breaker"] == "open 1/2"
    assert edges[("gateway", "orders")]["breaker"] == "closed"
    assert edges[("frontend", "orders")]["success_rate"] == pytest.approx(0.95)
    # a quiet minute later nothing is left, and the keys are forgotten
    assert stats.sample(1100.0)["services"] == [] and not stats.edges and not stats.breakers


def test_keys_are_bounded() -> None:
    stats = MeshStats(60.0, max_keys=3)
    stats.record("a", "n", Stats(interval=1.0, routes=(route("b"), route("c"))), 1000.0)
    assert len(stats.services) + len(stats.edges) + len(stats.routes) == 3
    assert stats.keys_dropped == 3


def test_denials_are_kept_newest_first_and_bounded() -> None:
    stats = MeshStats(60.0, max_denials=2)
    for i in range(3):
        stats.record("orders", "n", Stats(interval=1.0, denials=(Denial(at=float(i), reason=f"r{i}"),),
                                          denials_dropped=1), 1000.0)
    assert [d["reason"] for d in stats.sample(1000.0)["denials"]] == ["r2", "r1"]
    assert stats.denials_seen == 6


def test_a_new_slo_window_starts_with_the_live_windows_traffic() -> None:
    stats = MeshStats(60.0)
    stats.record("frontend", "n", Stats(interval=5.0, routes=(route(requests=100, errors=2),)), 1000.0)
    stats.set_objectives({"orders": SloConfig(window=3600.0, availability=0.99)}, 1001.0)
    counts = stats.slo_counts("orders", 1001.0)
    assert counts is not None and counts[0].requests == 100
    stats.record("frontend", "n", Stats(interval=5.0, routes=(route(requests=100),)), 1005.0)
    # unchanged objectives keep the window; a new window length starts a new one
    stats.set_objectives({"orders": SloConfig(window=3600.0, availability=0.99)}, 1006.0)
    assert stats.slo_counts("orders", 1006.0)[0].requests == 200  # type: ignore[index]
    stats.set_objectives({}, 1007.0)
    assert stats.slo_counts("orders", 1007.0) is None


def test_slo_verdicts_and_error_budget() -> None:
    slo = SloConfig(availability=0.999, error_rate=0.01, p95=0.1, breaker_activation=0.01,
                    min_requests=100)
    good = Counts(requests=1000, errors=0, latency=list(hist(ms5=1000)))
    status = evaluate("orders", slo, good, 60.0)
    assert status.state == "ok" and status.budget_remaining == 1.0
    half = Counts(requests=1000, errors=1, latency=list(hist(ms5=1000)))  # 0.1% of 0.1% used
    assert evaluate("orders", slo, half, 60.0).budget_remaining == pytest.approx(0.0)
    bad = Counts(requests=1000, errors=5, breaker_opens=20, latency=list(hist(ms250=1000)))
    status = evaluate("orders", slo, bad, 60.0)
    assert status.state == "violated"
    assert {o.name for o in status.objectives if o.ok is False} == {
        "availability", "p95", "breaker_activation"}
    assert status.budget_remaining == pytest.approx(-4.0)  # the stricter budget: 0.1%
    few = Counts(requests=99, errors=99)
    assert evaluate("orders", slo, few, 60.0).state == "no_data"


def test_objectives_are_read_from_an_applied_mesh() -> None:
    mesh = {"services": {"orders": {"slo": {"availability": "99.9%", "window": "1h"}},
                         "cart": {}}}
    [(name, slo)] = objectives_of(mesh).items()
    assert name == "orders" and slo.window == 3600.0
    assert slo.availability == pytest.approx(0.999) and slo.p95 is None
