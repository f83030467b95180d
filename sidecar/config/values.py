"""Small readers shared by the config sections of failure containment (retries, breaker,
health checks, fault injection): status codes and ranges, bounded sizes, an optional
sub-section, and how a duration is shown in an error. Pure: no I/O."""

from __future__ import annotations

import re
from typing import Any

from .reader import Fields

__all__ = ["bounded_size", "secs", "status_code", "status_range"]

_STATUS_RANGE = re.compile(r"^\s*(\d{3})\s*-\s*(\d{3})\s*$")


def status_code(item: Any, low: int) -> int | None:
    """A status code given as 503 or "503", within ``low``..599."""
    if isinstance(item, bool):
        return None
    if isinstance(item, str) and item.strip().isdigit():
        item = int(item)
    if isinstance(item, int) and low <= item <= 599:
        return item
    return None


def status_range(item: Any) -> tuple[int, int] | None:
    single = status_code(item, 100)
    if single is not None:
        return single, single
    if isinstance(item, str):
        m = _STATUS_RANGE.match(item)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if 100 <= lo <= hi <= 599:
                return lo, hi
    return None


def bounded_size(node: Fields, key: str, default: int, maximum: int) -> int:
    value: int = node.size(key, default)
    if value > maximum:
        node.error(key, f"must be ≤ {maximum // 1024**2}MiB, got {node.data[key]!r}")
        return default
    return value


def secs(value: float) -> str:
    return f"{value * 1000:g}ms" if value < 1 else f"{value:g}s"
