"""A route's ``rate_limit`` section: token buckets keyed by who calls.

Pure: no I/O; ``sidecar/filters/rate_limit.py`` runs the buckets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from .reader import Fields

__all__ = ["RateLimitConfig", "parse_rate", "parse_rate_limit"]

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_RATE_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
               "h": 3600.0, "hour": 3600.0}


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    rate: float  # tokens per second
    spec: str  # as written, e.g. "100/s", for headers and dumps
    burst: int  # bucket size
    key: Literal["source", "subject", "api_key", "client_ip", "global"] = "client_ip"
    max_keys: int = 10_000



def parse_rate(value: Any) -> tuple[float, float]:
    """``100/s``, ``6000/m``, ``10/h`` -> (count, seconds per unit)."""
    if isinstance(value, str):
        m = _RATE.match(value)
        if m and float(m.group(1)) > 0:
            return float(m.group(1)), _RATE_UNITS[m.group(2)]
    raise ValueError(f"must be a rate like 100/s, 6000/m or 10/h, got {value!r}")


def parse_rate_limit(node: Fields) -> RateLimitConfig:
    """A route's ``rate_limit``. The default burst is one second's worth (at least 1), so a
    client can burst a little but the rate over a few seconds stays close to the rate."""
    spec = node.raw("rate")
    rate, burst_default = 1.0, 1
    if spec is not None:
        try:
            count, unit = parse_rate(spec)
        except ValueError as exc:
            node.error("rate", str(exc))
        else:
            rate = count / unit
            burst_default = max(1, min(int(count), -int(-rate // 1)))
    config = RateLimitConfig(
        rate=rate,
        spec=spec if isinstance(spec, str) else "",
        burst=node.int("burst", burst_default, min=1, max=10_000_000),
        key=node.str("key", "client_ip",
                     choices=("source", "subject", "api_key", "client_ip", "global")),
        max_keys=node.int("max_keys", 10_000, min=1, max=10_000_000),
    )
    node.done()
    return config
