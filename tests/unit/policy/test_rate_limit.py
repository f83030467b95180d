"""Token buckets: accuracy over simulated time, the 429 and its headers, keys, and the
bounded key table."""

from __future__ import annotations

import random
from typing import Any

import pytest

from sidecar.config.model import RouteConfig, RouteMatch, WeightedTarget
from sidecar.config.rate_limit import RateLimitConfig, parse_rate_limit
from sidecar.config.reader import Fields, Problems
from sidecar.filters.rate_limit import RateLimiter, build_rate_limit

from .conftest import FakeClock, exchange, request

ROUTE = RouteConfig(name="orders/0", match=RouteMatch(), to=(WeightedTarget("orders"),))


def config(**values: Any) -> RateLimitConfig:
    problems = Problems()
    parsed = parse_rate_limit(Fields(values, "services.orders.routes[0].rate_limit", problems))
    assert problems.items == []
    return parsed


def run(limiter: RateLimiter, clock: FakeClock, seconds: float, arrivals_per_s: float,
        *, rng: random.Random | None = None) -> int:
    """Requests arrive for ``seconds`` of simulated time; returns how many were allowed."""
    allowed = 0
    end = clock.now + seconds
    while clock.now < end:
        allowed += limiter.take("k", clock.now).allowed
        gap = 1.0 / arrivals_per_s
        clock.advance(rng.expovariate(arrivals_per_s) if rng else gap)
    return allowed


@pytest.mark.parametrize(("rate", "per_second"), [("100/s", 100), ("6000/m", 100),
                                                  ("20/s", 20), ("3/s", 3)])
@pytest.mark.parametrize("arrivals", [2.0, 10.0])  # demand: 2x and 10x the rate
def test_rate_within_ten_percent_over_five_seconds(rate: str, per_second: float,
                                                   arrivals: float) -> None:
    clock = FakeClock()
    limiter = RateLimiter(config(rate=rate))
    burst = limiter.config.burst
    # The initial burst is spent first (demand drains it at arrivals - rate per second);
    # then over 5 s of random (Poisson) arrivals the rate holds within 10%.
    run(limiter, clock, burst / (per_second * (arrivals - 1)) + 0.01, per_second * arrivals)
    allowed = run(limiter, clock, 5.0, per_second * arrivals, rng=random.Random(7))
    assert abs(allowed - 5 * per_second) <= 0.1 * 5 * per_second
    # With burst 1 and evenly paced demand, even counting from a full bucket.
    fresh, clock2 = RateLimiter(config(rate=rate, burst=1)), FakeClock()
    allowed = run(fresh, clock2, 5.0, per_second * arrivals)
    assert abs(allowed - 5 * per_second) <= 0.1 * 5 * per_second


def test_default_burst_is_one_second_worth() -> None:
    assert config(rate="100/s").burst == 100
    assert config(rate="6000/m").burst == 100
    assert config(rate="10/m").burst == 1
    assert config(rate="100/s", burst=5).burst == 5


def test_429_with_retry_after_and_ratelimit_headers() -> None:
    clock = FakeClock()
    f = build_rate_limit({"orders/0": config(rate="2/s", burst=2)}, clock=clock)
    ex = lambda: exchange(request(), route=ROUTE)  # noqa: E731
    assert f.on_request(ex()) is None and f.on_request(ex()) is None
    reply = f.on_request(ex())
    assert (reply.status, reply.flag, reply.error) == (429, "RL", "rate_limited")
    assert dict(reply.headers) == {
        b"retry-after": b"1", b"ratelimit-limit": b"2", b"ratelimit-remaining": b"0",
        b"ratelimit-reset": b"1", b"ratelimit-policy": b"2;w=1"}
    assert "2/s" in reply.detail
    clock.advance(0.5)  # one token back
    assert f.on_request(ex()) is None
    slow = build_rate_limit({"orders/0": config(rate="1/m")}, clock=clock)
    assert slow.on_request(ex()) is None
    clock.advance(1)
    assert dict(slow.on_request(ex()).headers)[b"retry-after"] == b"59"
    assert f.limited == 1


def test_keys_and_fallbacks() -> None:
    clock = FakeClock()

    def limited(key: str, **kw: Any) -> list[bool]:
        f = build_rate_limit({"orders/0": config(rate="1/m", key=key)}, clock=clock)
        out = []
        for ex_kw in ({"peer": "spiffe://pake.local/service/a", "client": "10.0.0.1"},
                      {"peer": "spiffe://pake.local/service/b", "client": "10.0.0.1"},
                      {"peer": None, "client": "10.0.0.2", "tags": {"authn": "jwt"},
                       "principal": "alice"},
                      {"peer": None, "client": "10.0.0.3", "tags": {"authn": "jwt"},
                       "principal": "alice"},
                      {"peer": None, "client": "10.0.0.2",
                       "tags": {"authn": "api_key", "api_key": "ci"}},
                      {"peer": None, "client": "10.0.0.4",
                       "tags": {"authn": "api_key", "api_key": "ci"}}):
            tags = ex_kw.pop("tags", {})
            ex = exchange(request(), route=ROUTE, **ex_kw)  # type: ignore[arg-type]
            ex.tags.update(tags)
            out.append(f.on_request(ex) is not None)
        return out

    assert limited("source") == [False, False, False, False, True, False]
    assert limited("client_ip") == [False, True, False, False, True, False]
    assert limited("subject") == [False, True, False, True, False, False]
    assert limited("api_key") == [False, True, False, False, False, True]
    assert limited("global") == [False, True, True, True, True, True]


def test_key_table_is_bounded_under_a_flood() -> None:
    clock = FakeClock()
    f = build_rate_limit({"orders/0": config(rate="1/s", max_keys=100)}, clock=clock)
    for i in range(10_000):
        client = f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"
        f.on_request(exchange(request(), route=ROUTE, client=client))
    limiter = f.limiters["orders/0"]
    assert len(limiter) == 100 and limiter.evicted == 9_900
    # The most recent keys are the ones kept.
    assert f.on_request(exchange(request(), route=ROUTE, client="10.0.39.15")) is not None


def test_unrouted_or_unlimited_routes_pass_and_limiters_survive_a_swap() -> None:
    clock = FakeClock()
    f = build_rate_limit({"orders/0": config(rate="1/m")}, clock=clock)
    assert f.on_request(exchange(request())) is None  # no route yet: not ours
    other = RouteConfig(name="other", match=RouteMatch(), to=(WeightedTarget("x"),))
    assert f.on_request(exchange(request(), route=other)) is None
    assert f.on_request(exchange(request(), route=ROUTE)) is None
    kept = build_rate_limit({"orders/0": config(rate="1/m")}, clock=clock, previous=f)
    assert kept.on_request(exchange(request(), route=ROUTE)) is not None  # same bucket
    changed = build_rate_limit({"orders/0": config(rate="2/m")}, clock=clock, previous=f)
    assert changed.on_request(exchange(request(), route=ROUTE)) is None


def test_clock_stepping_back_does_not_drain() -> None:
    limiter = RateLimiter(config(rate="1/s", burst=1))
    assert limiter.take("k", 100.0).allowed
    assert not limiter.take("k", 99.0).allowed
    assert limiter.take("k", 101.0).allowed


def test_bad_rate_limit_config() -> None:
    problems = Problems()
    parse_rate_limit(Fields({"rate": "fast", "burst": 0, "key": "cookie", "x": 1},
                            "services.orders.routes[0].rate_limit", problems))
    text = "\n".join(problems.items)
    for expected in ("rate_limit.rate: must be a rate like 100/s",
                     "rate_limit.burst: must be ≥ 1", "rate_limit.key: must be one of",
                     "rate_limit.x: unknown key"):
        assert expected in text
