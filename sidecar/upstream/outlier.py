"""Passive outlier ejection: an endpoint that keeps failing real traffic is left out for a while.

``record`` counts consecutive 5xx and gateway errors per endpoint (a connect failure, reset or
timeout counts as both, as in Envoy: it is a gateway error the proxy made itself) and ejects
the endpoint for ``base_ejection_time × times ejected`` (capped at ``max_ejection_time``),
unless that would eject more than ``max_ejected_percent`` of the cluster (one is always
allowed). The load balancer skips an endpoint while ``now < ejected_until``, so it returns by
itself; ``sweep`` only reports the returns. Pure: no asyncio imports; ``now`` comes in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from ..config.outlier import OutlierConfig
from .endpoint import EndpointState, Outcome

__all__ = ["EjectionCallback", "OutlierDetector"]

EjectionCallback = Callable[[EndpointState, bool, str], None]  # (endpoint, ejected, reason)


def _ignore(endpoint: EndpointState, ejected: bool, reason: str) -> None:
    pass


class OutlierDetector:
    """The outlier rules of one cluster. Holds no per-endpoint state of its own: that lives in
    ``EndpointState``, which survives snapshot swaps."""

    __slots__ = ("config", "ejections", "overflows", "_on_change", "_max_multiplier")

    def __init__(self, config: OutlierConfig, *, on_change: EjectionCallback | None = None) -> None:
        self.config = config
        self.ejections = 0  # total, for metrics
        self.overflows = 0  # ejections skipped because of max_ejected_percent
        self._on_change = on_change or _ignore
        # Beyond this the ejection time is capped anyway: the multiplier need not grow further.
        self._max_multiplier = math.ceil(config.max_ejection_time / config.base_ejection_time) + 1

    def record(self, now: float, endpoint: EndpointState, outcome: Outcome,
               endpoints: Sequence[EndpointState]) -> bool:
        """How a try at ``endpoint`` (one of ``endpoints``, its cluster) ended. True when this
        ejected it."""
        if outcome is Outcome.CANCELLED or endpoint.ejected_until > now:
            return False  # late answers from an ejected endpoint do not lengthen its ejection
        if outcome is Outcome.SUCCESS:
            endpoint.consecutive_5xx = 0
            endpoint.consecutive_gateway_errors = 0
            return False
        endpoint.consecutive_5xx += 1
        if outcome is Outcome.STATUS_5XX:
            endpoint.consecutive_gateway_errors = 0
        else:
            endpoint.consecutive_gateway_errors += 1
        cfg = self.config
        if cfg.consecutive_5xx and endpoint.consecutive_5xx >= cfg.consecutive_5xx:
            return self._eject(now, endpoint, endpoints, "consecutive_5xx")
        if (cfg.consecutive_gateway_errors
                and endpoint.consecutive_gateway_errors >= cfg.consecutive_gateway_errors):
            return self._eject(now, endpoint, endpoints, "consecutive_gateway_errors")
        return False

    def sweep(self, now: float, endpoints: Sequence[EndpointState]) -> list[EndpointState]:
        """The endpoints whose ejection ended by ``now`` (each reported once, to log and meter)."""
        returned = []
        for e in endpoints:
            if e.ejected and e.ejected_until <= now:
                e.ejected = False
                returned.append(e)
                self._on_change(e, False, "ejection_time_elapsed")
        return returned

    def _eject(self, now: float, endpoint: EndpointState, endpoints: Sequence[EndpointState],
               reason: str) -> bool:
        cfg = self.config
        ejected = sum(1 for e in endpoints if e.ejected_until > now)
        if ejected and ejected + 1 > cfg.max_ejected_percent * len(endpoints):
            self.overflows += 1
            return False
        if endpoint.ejections:
            # Forgive one past ejection per base time spent back in service, so an endpoint
            # that failed once last week does not start at the maximum.
            quiet = now - endpoint.ejected_until
            endpoint.ejections = max(0, endpoint.ejections - int(quiet // cfg.base_ejection_time))
        endpoint.ejections = min(endpoint.ejections + 1, self._max_multiplier)
        endpoint.ejected_until = now + min(cfg.base_ejection_time * endpoint.ejections,
                                           cfg.max_ejection_time)
        endpoint.ejected = True
        endpoint.consecutive_5xx = 0
        endpoint.consecutive_gateway_errors = 0
        self.ejections += 1
        self._on_change(endpoint, True, reason)
        return True
