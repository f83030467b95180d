"""The router's own state of one exchange: ``Tries`` (its cluster and retry policy, the tries
so far and the one in flight), allocated once per routed exchange, never per try.

The router drives an exchange that the listener owns and never imports the listener at run
time (DESIGN: a stage depends only on what comes after it). It names the listener's ``Stream``
for type checking only. That seam used to be protocols here (satisfied structurally); the
compiled hot path reads a protocol-typed value's attributes by name, a dict lookup each, and
the router touched ~35 of them per exchange (callgrind), so it names the concrete class.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..errors import LocalReply
    from ..upstream.circuit_breaker import Admission
    from ..upstream.cluster import Cluster
    from ..upstream.endpoint import EndpointState, Outcome
    from ..upstream.pool import Pool
    from ..upstream.retry import RetryPolicy

__all__ = ["Tries"]


class Tries:
    """The router's state of one exchange: where it goes, how it may be retried, what was
    tried, and the try in flight (its breaker admission, endpoint, pool and outcome).
    ``timer`` (a backoff or an injected delay) and ``connecting`` (a new connection being
    opened) are the two ways a try waits; ending the exchange cancels either."""

    __slots__ = (
        "cluster", "policy", "head_bytes", "tail", "tried", "retries", "admission", "endpoint", "pool",
        "outcome", "last_reply", "reused", "resent", "head_sent", "retries_exhausted", "timer",
        "connecting",
    )

    def __init__(self, cluster: Cluster, policy: RetryPolicy) -> None:
        self.cluster = cluster
        self.policy = policy  # the RetryPolicy of this exchange's route
        self.head_bytes = b""  # the request head for upstream, less its tries' own lines...
        self.tail = 0  # ... or with the first try's, its last ``tail`` bytes (``Router._head``)
        # endpoints tried: a retry prefers another. The endpoints, not their addresses: an
        # address is a tuple kept unboxed in its endpoint once compiled, and a new tuple (and
        # port int) each time it is read as an object (~200 instructions a try, callgrind)
        self.tried: list[EndpointState] = []
        self.retries = 0  # retries charged to the policy (a keep-alive race re-send is free)
        self.admission: Admission | None = None  # the breaker's admission of the try in flight
        self.endpoint: EndpointState | None = None  # the endpoint of the try in flight
        self.pool: Pool | None = None  # that endpoint's pool
        self.outcome: Outcome | None = None  # how the try in flight ended, once its head arrived
        self.last_reply: LocalReply | None = None  # the last failed try's reply, if retries stop
        self.reused = False  # the try in flight went out on a pooled keep-alive connection
        self.resent = False  # the one free re-send after a keep-alive race was used
        self.head_sent = False  # the request went out once (a re-send replays the body copy)
        self.retries_exhausted = False  # a failed response was forwarded: no retry was left
        self.timer: asyncio.TimerHandle | None = None  # a backoff or an injected delay
        self.connecting: asyncio.Task[None] | None = None  # opening (or waiting for) a connection
