"""The ``rate_limit`` filter: token buckets per route, keyed by who is calling.

A bucket holds up to ``burst`` tokens and gains ``rate`` per second; a request takes one
or is answered 429 (flag ``RL``) with ``Retry-After`` (seconds until a token);
``RateLimit-Limit``/``-Remaining``/``-Reset``/``-Policy`` go on every response of the route
(the 429 and, through ``Exchange.response_headers``, the upstream's answers and other local
replies). The math is pure and takes
``now`` from the injected clock, so tests move time by hand. The key is the source's
SPIFFE ID, the JWT subject, the API key's name, the client address or one global bucket;
a request without the chosen identity falls back to its client address. Each route's key
table is an LRU bounded by ``max_keys``: a flood of new keys evicts the least recently
used (which then start again full) instead of growing memory.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from ..clock import Clock
from ..config.rate_limit import RateLimitConfig
from ..errors import LocalReply, RateLimited
from ..exchange import Exchange

__all__ = ["RateLimitFilter", "RateLimiter", "Verdict", "build_rate_limit", "rate_limit_headers"]


@dataclass(slots=True)
class Verdict:
    """Read-only by convention; ``__init__`` written out as in ``RbacDecision``."""

    allowed: bool
    remaining: int  # whole tokens left after this request
    retry_after: float  # seconds until one token (0 when allowed)
    reset: float  # seconds until the bucket is full again

    def __init__(self, allowed: bool, remaining: int, retry_after: float, reset: float) -> None:
        self.allowed = allowed
        self.remaining = remaining
        self.retry_after = retry_after
        self.reset = reset


# Refill adds rate * elapsed in floating point: 0.5 + 0.5 may come out as 0.9999999999.
# Without this tolerance a client pacing itself exactly at the rate would lose tokens.
_EPSILON: Final = 1e-9


class _Bucket:
    __slots__ = ("last", "tokens")

    def __init__(self, tokens: float, last: float) -> None:
        self.tokens = tokens
        self.last = last


class RateLimiter:
    """One route's buckets. ``take(key, now)`` is the whole algorithm."""

    def __init__(self, config: RateLimitConfig, route: str = "") -> None:
        self.config = config
        self.route = route
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, now: float) -> Verdict:
        rate, burst = self.config.rate, float(self.config.burst)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(burst, now)
            if len(self._buckets) > self.config.max_keys:
                self._buckets.popitem(last=False)
                self.evicted += 1
        else:
            self._buckets.move_to_end(key)
            # max(): a clock that steps back must not drain the bucket.
            bucket.tokens = min(burst, bucket.tokens + max(0.0, now - bucket.last) * rate)
            bucket.last = max(bucket.last, now)
        if bucket.tokens >= 1.0 - _EPSILON:
            bucket.tokens = max(0.0, bucket.tokens - 1.0)
            return Verdict(True, int(bucket.tokens), 0.0, (burst - bucket.tokens) / rate)
        return Verdict(False, 0, (1.0 - bucket.tokens) / rate, (burst - bucket.tokens) / rate)


def _key(config: RateLimitConfig, ex: Exchange) -> str:
    kind = config.key
    if kind == "global":
        return ""
    if kind == "source" and ex.peer_identity:
        return ex.peer_identity
    if kind == "subject" and ex.tags.get("authn") == "jwt" and ex.principal:
        return "sub:" + ex.principal
    if kind == "api_key" and "api_key" in ex.tags:
        return "key:" + ex.tags["api_key"]
    return "ip:" + ex.downstream_address


def rate_limit_headers(config: RateLimitConfig,
                       verdict: Verdict) -> tuple[tuple[bytes, bytes], ...]:
    """The ``RateLimit-*`` headers for ``verdict`` (and ``Retry-After`` when refused)."""
    window = max(1, math.ceil(config.burst / config.rate))
    out = [
        (b"ratelimit-limit", str(config.burst).encode()),
        (b"ratelimit-remaining", str(verdict.remaining).encode()),
        (b"ratelimit-reset", str(math.ceil(verdict.reset)).encode()),
        (b"ratelimit-policy", f"{config.burst};w={window}".encode()),
    ]
    if not verdict.allowed:
        # Whole seconds, rounded up: a client that waits this long gets a token.
        out.insert(0, (b"retry-after", str(max(1, math.ceil(verdict.retry_after))).encode()))
    return tuple(out)


class RateLimitFilter:
    name = "rate_limit"

    def __init__(self, limiters: Mapping[str, RateLimiter], *, clock: Clock) -> None:
        self.limiters = dict(limiters)  # route name -> limiter
        self.clock = clock
        self.limited = 0  # counter, read by metrics

    def on_request(self, exchange: Exchange) -> LocalReply | None:
        # The route must be matched before the filters run; without one the router answers.
        route = exchange.route
        limiter = self.limiters.get(route.name) if route is not None else None
        if limiter is None:
            return None
        config = limiter.config
        verdict = limiter.take(_key(config, exchange), self.clock.monotonic())
        if verdict.allowed:
            # the client learns its budget on every answer, not only once it is spent
            exchange.response_headers = rate_limit_headers(config, verdict)
            return None
        self.limited += 1
        exchange.tag("rate_limit", config.key)
        detail = f"more than {config.spec or config.rate} on route {limiter.route}"
        return RateLimited(detail, headers=rate_limit_headers(config, verdict)).reply()


def build_rate_limit(routes: Mapping[str, RateLimitConfig], *, clock: Clock,
                     previous: RateLimitFilter | None = None) -> RateLimitFilter:
    """One filter for every route with a ``rate_limit`` (route name -> config). Limiters of
    ``previous`` whose config is unchanged are kept, so a snapshot swap does not refill
    every bucket."""
    old = previous.limiters if previous is not None else {}
    limiters = {}
    for name, config in routes.items():
        kept = old.get(name)
        same = kept is not None and kept.config == config
        limiters[name] = kept if same and kept is not None else RateLimiter(config, name)
    return RateLimitFilter(limiters, clock=clock)
