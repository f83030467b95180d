"""What the resilience code knows about one endpoint, and how one try at it ended.

``EndpointState`` is the endpoint's health as the load balancer sees it: the active health
check's verdict, the outlier detector's ejection, the load (active requests) and whether its
last try failed. ``Outcome`` is the classification of one try, the input the circuit breaker,
the outlier detector and the retry policy take (linkerd's "classified responses"), and
``isolated_failure`` its scope: a failure that one endpoint causes belongs to that endpoint
(the outlier detector counts it, a retry goes elsewhere), not to the service as a whole (the
circuit breaker and the retry budget). Pure: no I/O, no asyncio imports.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from ..config.model import Address

__all__ = ["EndpointState", "Outcome", "isolated_failure", "outcome_of_status"]


class Outcome(enum.IntEnum):
    """How one try ended. An ``IntEnum`` so that failure sets compile to bit masks."""

    SUCCESS = 0  # a response head with status < 500 (a 4xx is the client's fault)
    CONNECT_FAILURE = 1  # no connection (refused, unreachable, TLS, identity): nothing was sent
    RESET = 2  # the connection closed or broke before a complete response head
    TIMEOUT = 3  # the per-try timeout fired before the response head arrived
    STATUS_5XX = 4  # a 5xx response other than 502, 503, 504
    GATEWAY_ERROR = 5  # a 502, 503 or 504 response
    CANCELLED = 6  # the downstream went away: says nothing about the upstream, counts for nothing


def outcome_of_status(status: int) -> Outcome:
    """The outcome of a try that got a response head with ``status``."""
    if status < 500:
        return Outcome.SUCCESS
    if 502 <= status <= 504:
        return Outcome.GATEWAY_ERROR
    return Outcome.STATUS_5XX


@dataclass(slots=True, eq=False)
class EndpointState:
    """One endpoint of a cluster. Mutated in place by the health checker, the outlier detector,
    the load balancer and the data plane; identity equality, so it can live in sets."""

    address: Address
    weight: int = 1  # relative share of traffic (load_balancer.weights)
    # Active health checking. Optimistic: an endpoint is used until a check says otherwise,
    # so a cluster without health checks, or one that has just started, still serves.
    healthy: bool = True
    # Passive outlier detection (outlier.py).
    ejected: bool = False  # reported state; the load balancer reads ``ejected_until`` instead
    ejected_until: float = 0.0  # monotonic time; the endpoint is skipped while now < this
    ejections: int = 0  # times ejected recently; the ejection time grows with it
    consecutive_5xx: int = 0
    consecutive_gateway_errors: int = 0
    # Load, kept by the data plane: +1 when a try is sent, -1 when it ends.
    active_requests: int = 0
    # Kept by the data plane: the last try at this endpoint that ended (not cancelled) failed.
    # Optimistic like ``healthy``: an endpoint not tried yet is not failing.
    failing: bool = False
    # Scratch of the smooth weighted round robin (nginx's ``current_weight``).
    current_weight: int = 0

    @property
    def address_text(self) -> str:
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def available(self, now: float) -> bool:
        """May get traffic at ``now``: passing health checks and not ejected."""
        return self.healthy and self.ejected_until <= now

    def snapshot(self, now: float) -> dict[str, object]:
        return {
            "address": self.address_text,
            "weight": self.weight,
            "healthy": self.healthy,
            "ejected": self.ejected_until > now,
            "ejected_for": round(max(0.0, self.ejected_until - now), 3),
            "ejections": self.ejections,
            "active_requests": self.active_requests,
            "failing": self.failing,
        }


def isolated_failure(endpoint: EndpointState, endpoints: Sequence[EndpointState],
                     now: float) -> bool:
    """Is a failed try at ``endpoint`` that endpoint's alone: is another endpoint of its cluster
    in use at ``now`` (healthy, not ejected) whose last try did not fail?

    Then the service still answers, and the failure is the endpoint's: the outlier detector
    counts it and a retry goes to another endpoint, but it is no evidence that the service as a
    whole fails, so the circuit breaker does not count it and its retry spends no budget. When
    every endpoint in use fails (or this is the only one), the failure is the service's. Only
    called on a failure: a scan of the cluster's endpoints, allocating nothing."""
    for e in endpoints:
        if e is not endpoint and not e.failing and e.healthy and e.ejected_until <= now:
            return True
    return False
