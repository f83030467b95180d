"""Config of outlier ejection: passive, from the outcomes of real traffic, per endpoint.

Frozen slotted dataclasses and ``parse_*(node: Fields)``: bad values are reported with their
full path, unknown keys through ``Fields``. Defaults live here and nowhere else. Pure: no I/O.
The YAML shape; the values shown are the defaults, except where a comment says optional or e.g.::

    services:
      orders:
        outlier:                       # passive ejection from real traffic
          consecutive_5xx: 5           # 0: off; connect failures, resets, timeouts count as 5xx
          consecutive_gateway_errors: 0   # 502/503/504 (and local failures); 0: off
          base_ejection_time: 30s      # ejected for base × times ejected ...
          max_ejection_time: 300s      # ... at most this
          max_ejected_percent: 10%     # never eject more (but always allow one)
"""

from __future__ import annotations

from dataclasses import dataclass

from .reader import Fields
from .values import secs

__all__ = ["OutlierConfig", "parse_outlier"]


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    consecutive_5xx: int = 5  # 0: off
    consecutive_gateway_errors: int = 0  # 0: off
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    max_ejected_percent: float = 0.1


def parse_outlier(node: Fields) -> OutlierConfig:
    d = OutlierConfig()
    base = node.duration("base_ejection_time", d.base_ejection_time, min=0.001)
    max_time = node.duration("max_ejection_time", max(d.max_ejection_time, base), min=0.001)
    if max_time < base:
        node.error("max_ejection_time", f"must be ≥ base_ejection_time ({secs(base)}), "
                                        f"got {node.data['max_ejection_time']!r}")
        max_time = base
    config = OutlierConfig(
        consecutive_5xx=node.int("consecutive_5xx", d.consecutive_5xx, min=0, max=1_000_000),
        consecutive_gateway_errors=node.int("consecutive_gateway_errors",
                                            d.consecutive_gateway_errors, min=0, max=1_000_000),
        base_ejection_time=base,
        max_ejection_time=max_time,
        max_ejected_percent=node.percent("max_ejected_percent", d.max_ejected_percent),
    )
    node.done()
    return config
