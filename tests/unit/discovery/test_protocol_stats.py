"""The ``stats`` message: round trip, and every bound and type checked with its path."""

from __future__ import annotations

import json

import pytest

from sidecar.discovery.protocol import (
    LATENCY_BUCKETS,
    MAX_DENIALS,
    Denial,
    ProtocolError,
    RouteStats,
    Stats,
    decode,
    encode,
)


def test_round_trip() -> None:
    message = Stats(interval=5.0, routes=(RouteStats(
        route="frontend/0", destination="orders", requests=3, errors=1,
        latency=(0,) * len(LATENCY_BUCKETS) + (3,), breaker_opens=1, breaker="half_open"),),
        denials=(Denial(at=1.5, reason="no rule allows", source="spiffe://pake.local/service/x",
                        method="GET", path="/a"),), denials_dropped=2)
    assert decode(encode(message)) == message


def frame(**body: object) -> str:
    return json.dumps({"type": "stats", "interval": 5, **body})


@pytest.mark.parametrize(("text", "error"), [
    (frame(routes=[{"route": "r", "destination": "a b"}]), "stats.routes[0].destination: must be a simple name"),
    (frame(routes=[{"route": "r", "destination": "a", "requests": -1}]), "stats.routes[0].requests: must be a finite number ≥ 0"),
    (frame(routes=[{"route": "r", "destination": "a", "requests": 1.5}]), "stats.routes[0].requests: must be int"),
    (frame(routes=[{"route": "r", "destination": "a", "latency": [1, 2]}]), "stats.routes[0].latency: must be 16 counts"),
    (frame(routes=[{"route": "r", "destination": "a", "breaker": "ajar"}]), "stats.routes[0].breaker: must be one of"),
    (frame(routes=[{"destination": "a"}]), "stats.routes[0].route: is required"),
    (frame(routes=["x"]), "stats.routes[0]: must be an object"),
    (frame(denials=[{"reason": "x"}]), "stats.denials[0].at: is required"),
    (frame(denials=[{"at": 1, "reason": "x" * 300}]), "stats.denials[0].reason: longer than 256"),
    (frame(denials=[{"at": 1, "reason": "x"}] * (MAX_DENIALS + 1)), f"stats.denials: more than {MAX_DENIALS}"),
    (json.dumps({"type": "stats", "interval": 0}), "stats.interval: out of range"),
    ('{"type": "stats", "interval": 1, "denials": [{"at": NaN, "reason": "x"}]}', "stats.denials[0].at: must be a finite number"),
])
def test_malformed_stats_are_refused_with_their_path(text: str, error: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(text)
    assert error in str(info.value)
