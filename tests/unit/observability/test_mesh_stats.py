"""The stats message from the counts Prometheus already keeps: deltas per route and destination,
errors, breaker trips, bounded denials. Exchanges are built by hand and fed to ``Metrics``;
clusters are small stand-ins with the two breaker fields the reporter reads."""

from __future__ import annotations

from dataclasses import dataclass, field

from sidecar.config.model import RouteConfig, RouteMatch, WeightedTarget
from sidecar.discovery.protocol import LATENCY_BUCKETS, MAX_DENIALS, decode, encode
from sidecar.exchange import Exchange
from sidecar.http.message import RequestHead
from sidecar.observability.mesh_stats import StatsReporter
from sidecar.observability.metrics import Metrics
from sidecar.upstream.circuit_breaker import BreakerState


@dataclass
class Breaker:
    state: BreakerState = BreakerState.CLOSED
    trips: int = 0


@dataclass
class Cluster:
    breaker: Breaker = field(default_factory=Breaker)


ROUTE = RouteConfig(name="orders/default", match=RouteMatch(), to=(WeightedTarget("orders"),))


def done(metrics: Metrics, *, listener: str = "outbound", status: int = 200, flags: str = "-",
         seconds: float = 0.003, path: str = "/orders/1", cluster: str = "orders") -> None:
    head = RequestHead(method="GET", target=path.encode(), path=path, authority="orders", host="orders",
                       version="1.1", headers=[])
    ex = Exchange(request=head, listener=listener, downstream_address="127.0.0.1", request_id="r", start=0.0)
    ex.route, ex.cluster, ex.status, ex.flags = ROUTE, cluster, status, flags
    if flags == "RBAC":
        ex.peer_identity, ex.reason = "spiffe://pake.local/service/web", "no rule allows it"
    metrics.exchange_done(ex, seconds)


def test_a_stats_message_holds_what_happened_since_the_last_one() -> None:
    metrics = Metrics()
    clusters = {"orders": Cluster()}
    now = [100.0]
    reporter = StatsReporter(metrics, lambda: clusters, clock=lambda: now[0])
    assert reporter.take() is None  # nothing seen: nothing sent
    for _ in range(7):
        done(metrics)
    done(metrics, status=503, flags="UO")  # a local reply: an error
    done(metrics, status=200, flags="UC")  # reset mid-body: an error below 500
    done(metrics, status=0, flags="DC")  # the caller left: not the destination's failure
    done(metrics, status=502)  # the upstream's own 5xx
    done(metrics, listener="inbound", cluster="local-app")  # the callee's view: not reported
    clusters["orders"].breaker.trips = 1
    clusters["orders"].breaker.state = BreakerState.OPEN
    now[0] = 105.0
    stats = reporter.take()
    assert stats is not None and decode(encode(stats)) == stats  # what the control plane accepts
    [entry] = stats.routes
    assert (entry.route, entry.destination, entry.requests, entry.errors) == ("orders/default", "orders", 11, 3)
    assert (entry.breaker_opens, entry.breaker) == (1, "open")
    assert entry.latency[LATENCY_BUCKETS.index(0.005)] == 11 and sum(entry.latency) == 11
    assert stats.interval == 5.0 and stats.denials == ()

    done(metrics, seconds=0.2)
    done(metrics, seconds=45.0)  # past the last bound: the +Inf bucket, the protocol's last count
    now[0] = 110.0
    again = reporter.take()
    assert again is not None and decode(encode(again)) == again
    [entry] = again.routes
    assert (entry.requests, entry.errors, entry.breaker_opens) == (2, 0, 0)  # deltas, not totals
    assert entry.latency[LATENCY_BUCKETS.index(0.25)] == 1
    assert len(entry.latency) == len(LATENCY_BUCKETS) + 1 and entry.latency[-1] == 1


def test_denials_are_bounded_and_the_overflow_counted() -> None:
    metrics = Metrics()
    reporter = StatsReporter(metrics, dict)
    for i in range(MAX_DENIALS + 8):
        done(metrics, listener="inbound", cluster="-", status=403, flags="RBAC", path=f"/admin/{i}")
    stats = reporter.take()
    assert stats is not None and stats.routes == ()
    assert len(stats.denials) == MAX_DENIALS and stats.denials_dropped == 8
    newest = stats.denials[-1]
    assert (newest.path, newest.flag, newest.status, newest.source) == (
        f"/admin/{MAX_DENIALS + 7}", "RBAC", 403, "spiffe://pake.local/service/web")
    assert reporter.take() is None  # each denial is sent once
