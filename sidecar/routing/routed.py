"""The seam between the router and the listener, typed from the router's side.

The router drives an exchange that the listener owns, but never imports the listener (DESIGN:
a stage depends only on what comes after it). ``RoutedStream`` and ``RoutedConnection`` name
the parts of the listener's ``Stream`` and ``DownstreamConnection`` that the router uses,
satisfied structurally; ``Driver`` is what the stream calls back as the upstream reports.
``Tries`` is the router's own state of one exchange (its cluster and retry policy, the tries
so far and the one in flight), allocated once per routed exchange, never per try.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol, Self, TypeVar

from ..upstream.upstream_connection import UpstreamListener

if TYPE_CHECKING:
    from ..config.model import Address
    from ..deadline import Deadline
    from ..errors import LocalReply, ProxyError
    from ..exchange import Exchange
    from ..http.message import RequestHead, ResponseHead
    from ..snapshot import Snapshot
    from ..upstream.circuit_breaker import Admission
    from ..upstream.cluster import Cluster
    from ..upstream.endpoint import EndpointState, Outcome
    from ..upstream.pool import Pool
    from ..upstream.retry import RetryPolicy
    from ..upstream.upstream_connection import UpstreamConnection

__all__ = ["Driver", "RoutedConnection", "RoutedStream", "Tries"]

S_contra = TypeVar("S_contra", contravariant=True)


class Driver(Protocol[S_contra]):
    """What moves an exchange on when its upstream side (or one of its deadlines) reports:
    every call the stream and the downstream connection make into the router."""

    def on_response_head(self, stream: S_contra, head: ResponseHead) -> bool: ...
    def on_response_end(self, stream: S_contra) -> None: ...
    def on_upstream_error(self, stream: S_contra, exc: ProxyError) -> None: ...
    def on_tunnel_open(self, stream: S_contra) -> None: ...
    def on_tunnel_closed(self, stream: S_contra) -> None: ...
    def on_timeout(self, stream: S_contra) -> None: ...
    def on_try_timeout(self, stream: S_contra) -> None: ...


class RoutedConnection(Protocol):
    """The downstream connection, as far as the router is concerned: the exchange's two
    deadlines, the switch to a tunnel, and reading resumed once a tunnel can carry it."""

    @property
    def route_deadline(self) -> Deadline: ...
    @property
    def try_deadline(self) -> Deadline: ...
    @property
    def BLOCK_BODY(self) -> int: ...  # noqa: N802 - the connection's constant, by its name
    def tunnel_opened(self) -> None: ...
    def unblock_reading(self, reason: int) -> None: ...


class RoutedStream(UpstreamListener, Protocol):
    """One exchange in flight, as the router sees it. Read-only properties are what the
    router reads; plain attributes are what it sets."""

    driver: Driver[Self] | None
    tries: Tries | None
    timeout: float  # the route timeout, running on conn.route_deadline
    replay_limit: int
    body_limit: int
    early_data: bytes
    response_done: bool
    keep_alive: bool

    @property
    def conn(self) -> RoutedConnection: ...
    @property
    def head(self) -> RequestHead: ...
    @property
    def exchange(self) -> Exchange: ...
    @property
    def snapshot(self) -> Snapshot: ...
    @property
    def upstream(self) -> UpstreamConnection | None: ...
    @property
    def response_started(self) -> bool: ...
    @property
    def finished(self) -> bool: ...

    def replayable(self) -> bool: ...
    def attach(self, upstream: UpstreamConnection, head_bytes: bytes, *, again: bool) -> None: ...
    def detach(self) -> None: ...


class Tries:
    """The router's state of one exchange: where it goes, how it may be retried, what was
    tried, and the try in flight (its breaker admission, endpoint, pool and outcome).
    ``timer`` (a backoff or an injected delay) and ``connecting`` (a new connection being
    opened) are the two ways a try waits; ending the exchange cancels either."""

    __slots__ = (
        "cluster", "policy", "head_bytes", "tried", "retries", "admission", "endpoint", "pool",
        "outcome", "last_reply", "reused", "resent", "head_sent", "retries_exhausted", "timer",
        "connecting",
    )

    def __init__(self, cluster: Cluster, policy: RetryPolicy) -> None:
        self.cluster = cluster
        self.policy = policy  # the RetryPolicy of this exchange's route
        self.head_bytes = b""  # the request head for upstream, less x-pake-attempts
        self.tried: list[Address] = []  # endpoint addresses tried: a retry prefers another
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
