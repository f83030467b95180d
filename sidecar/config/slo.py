"""A service's ``slo`` section: the objectives the control plane measures it against.

Sidecars only validate this section (a mesh they accept is one the control plane accepts);
the control plane (``control/slo.py``) reads it and computes each service, over its window,
from the stats its callers' sidecars send. Pure: no I/O. The YAML shape, e.g.::

    services:
      orders:
        slo:
          window: 1h                 # the sliding window the objectives hold over (10s..30d)
          availability: 99.9%        # requests answered without a 5xx or a local reply
          error_rate: 0.1%           # ceiling on errors / requests (the same errors)
          p95: 500ms                 # 95th percentile latency, as the callers' sidecars see it
          breaker_activation: 1%     # ceiling on breaker opens / requests
          min_requests: 10           # below this many requests in the window: no verdict

At least one objective is required. Availability and error rate count the same errors; a
service usually sets one of them, and its error budget comes from the stricter one.
"""

from __future__ import annotations

from dataclasses import dataclass

from .reader import Fields

__all__ = ["SloConfig", "parse_slo"]

MIN_WINDOW = 10.0
MAX_WINDOW = 30 * 86400.0
_OBJECTIVES = ("availability", "error_rate", "p95", "breaker_activation")


@dataclass(frozen=True, slots=True)
class SloConfig:
    window: float = 3600.0
    availability: float | None = None  # fraction, e.g. 0.999
    error_rate: float | None = None  # fraction, e.g. 0.001
    p95: float | None = None  # seconds
    breaker_activation: float | None = None  # fraction of requests
    min_requests: int = 10

    @property
    def allowed_error_ratio(self) -> float | None:
        """The error budget as a share of requests: the stricter of availability and error
        rate; None when neither is set."""
        ratios = [r for r in (None if self.availability is None else 1.0 - self.availability,
                              self.error_rate) if r is not None]
        return min(ratios) if ratios else None


def parse_slo(node: Fields) -> SloConfig:
    d = SloConfig()
    problems_before = len(node.problems.items)
    window = node.duration("window", d.window, min=MIN_WINDOW)
    if window > MAX_WINDOW:
        node.error("window", f"must be ≤ 30d, got {node.data['window']!r}")
        window = d.window
    availability = node.percent("availability", None)
    if availability is not None and availability in (0.0, 1.0):
        node.error("availability", f"must be between 0% and 100% (exclusive: 100% leaves no "
                                   f"error budget), got {node.data['availability']!r}")
        availability = None
    p95 = node.duration("p95", None, min=0.001)
    config = SloConfig(
        window=window,
        availability=availability,
        error_rate=node.percent("error_rate", None),
        p95=p95,
        breaker_activation=node.percent("breaker_activation", None),
        min_requests=node.int("min_requests", d.min_requests, min=1, max=1_000_000_000),
    )
    if all(getattr(config, name) is None for name in _OBJECTIVES) and len(node.problems.items) == problems_before:
        node.problems.add(node.path, f"needs at least one objective: {', '.join(_OBJECTIVES)}")
    node.done()
    return config
