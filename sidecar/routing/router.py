"""The router: the last stage. Sends the exchange to a cluster and sees it through.

It picks the route's target (weighted), the cluster's endpoint, a pooled connection, writes
the re-serialised request and hands the response to the stream, all inside the route
timeout (504 ``UT``). Everything is a callback: an idle pooled connection is used at once,
and only opening a new connection (or waiting for one) runs as a task. A request that fails
on a *reused* connection before any response byte is re-sent once on another connection:
the upstream closed an idle keep-alive connection just as we sent on it, which is routine
and not the request's fault.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

from ..config.model import RouteConfig, WeightedTarget
from ..errors import (LocalReply, NoRoute, ProxyError, UpstreamIdentityError, UpstreamReset,
                      UpstreamTimeout)
from ..http.writer import request_head
from ..listener.stream import Stream
from ..upstream.cluster import Cluster
from ..upstream.cluster_manager import LOCAL_APP, ClusterManager
from ..upstream.pool import Pool
from ..upstream.upstream_connection import UpstreamConnection

__all__ = ["Router"]

Finish = Callable[[Stream, "LocalReply | None"], None]


class Router:
    def __init__(self, clusters: ClusterManager, loop: asyncio.AbstractEventLoop, finish: Finish,
                 *, scheme: bytes = b"http", rng: random.Random | None = None) -> None:
        self.clusters = clusters
        self.loop = loop
        self.finish = finish
        self.scheme = scheme
        self._rng = rng or random.Random()

    def target(self, route: RouteConfig, listener: str) -> str:
        if listener == "inbound":
            return LOCAL_APP
        targets = route.to
        if len(targets) == 1:
            return targets[0].service
        return _weighted(targets, self._rng.random())

    # === start ==============================================================================
    def start(self, stream: Stream) -> None:
        ex = stream.exchange
        route = ex.route
        assert route is not None
        name = self.target(route, ex.listener)
        cluster = self.clusters.get(name)
        if cluster is None:
            self.finish(stream, NoRoute(f"no cluster {name!r}").reply())
            return
        ex.cluster = name
        stream.cluster = cluster
        stream.driver = self
        stream.timeout = timeout = route.timeout or cluster.timeouts.route
        stream.conn.route_deadline.set_in(timeout)
        stream.head_bytes = self._head(stream)
        self._attempt(stream)

    def _head(self, stream: Stream) -> bytes:
        head = stream.head
        ex = stream.exchange
        client = ex.downstream_address.encode()
        xff = head.forwarded_for
        extra = [(b"x-forwarded-for", xff + b", " + client if xff is not None else client)]
        if head.forwarded_proto is None:
            extra.append((b"x-forwarded-proto", self.scheme))
        if ex.peer_identity is not None:
            extra.append((b"x-pake-peer-identity", ex.peer_identity.encode()))
        if head.chunked:
            extra.append((b"transfer-encoding", b"chunked"))
        elif head.content_length is not None:
            extra.append((b"content-length", b"%d" % head.content_length))
        if head.upgrade is not None:
            extra.append((b"connection", b"upgrade"))
            extra.append((b"upgrade", head.upgrade))
        return request_head(head, extra)

    # === attempts ===========================================================================
    def _attempt(self, stream: Stream) -> None:
        cluster: Cluster = stream.cluster  # type: ignore[assignment]
        pool = cluster.pick()
        stream.pool = pool
        stream.exchange.upstream = pool.address_text
        conn = pool.take_idle()
        if conn is not None:
            self._send(stream, pool, conn, True)
        else:
            stream.task = self.loop.create_task(self._connect(stream, pool, cluster))

    async def _connect(self, stream: Stream, pool: Pool, cluster: Cluster) -> None:
        try:
            conn, reused = await pool.acquire(cluster.timeouts.connect)
        except ProxyError as exc:
            stream.task = None
            self._end(stream, exc.reply())
            return
        stream.task = None
        if stream.finished:
            pool.put_back(conn)
            return
        self._send(stream, pool, conn, reused)

    def _send(self, stream: Stream, pool: Pool, conn: UpstreamConnection, reused: bool) -> None:
        ex = stream.exchange
        expected = stream.cluster.expected_identity  # type: ignore[attr-defined]
        if expected is not None and conn.peer_identity != expected:
            conn.reusable = False
            pool.release(conn)
            self._end(stream, UpstreamIdentityError(
                f"{pool.address_text} presented {conn.peer_identity or 'no identity'}, expected"
                f" {expected}").reply())
            return
        ex.attempts += 1
        stream.reused = reused
        pool.active_requests += 1
        conn.start(stream, stream.head.method == "HEAD")
        stream.attach(conn, stream.head_bytes, again=ex.attempts > 1)

    def _release(self, stream: Stream) -> None:
        conn = stream.upstream
        pool = stream.pool
        if conn is not None and pool is not None:
            pool.active_requests -= 1
            stream.detach()
            pool.release(conn)

    # === upstream events (Driver) ============================================================
    def on_response_end(self, stream: Stream) -> None:
        self._release(stream)
        self._end(stream, None)

    def on_upstream_error(self, stream: Stream, exc: ProxyError) -> None:
        conn = stream.upstream
        retry = (isinstance(exc, UpstreamReset) and stream.reused and not stream.resent
                 and conn is not None and not conn.response_started() and stream.replayable())
        self._release(stream)
        if retry and not stream.finished:
            stream.resent = True
            self._attempt(stream)
            return
        self._end(stream, exc.reply())

    def on_tunnel_open(self, stream: Stream) -> None:
        """101: from now on both connections carry raw bytes until either side closes."""
        stream.conn.route_deadline.clear()
        upstream = stream.upstream
        assert upstream is not None
        if stream.early_data:
            upstream.write(stream.early_data)
            stream.early_data = b""
        stream.conn.unblock_reading(stream.conn.BLOCK_BODY)

    def on_tunnel_closed(self, stream: Stream) -> None:
        stream.response_done = True
        stream.keep_alive = False
        self._end(stream, None)

    def on_timeout(self, stream: Stream) -> None:
        self._end(stream, UpstreamTimeout(
            f"no complete response from {stream.exchange.cluster} within {stream.timeout}s").reply())

    # === ending =============================================================================
    def abort(self, stream: Stream) -> None:
        """The downstream went away: stop everything this exchange holds."""
        self._end(stream, None)

    def _end(self, stream: Stream, reply: LocalReply | None) -> None:
        if stream.finished:
            return
        stream.conn.route_deadline.clear()
        if stream.task is not None:
            stream.task.cancel()
            stream.task = None
        conn = stream.upstream
        if conn is not None:  # not released: the exchange did not complete on it
            conn.abort()
            self._release(stream)
        self.finish(stream, reply)


def _weighted(targets: tuple[WeightedTarget, ...], r: float) -> str:
    total = sum(t.weight for t in targets)
    point = r * total
    for t in targets:
        point -= t.weight
        if point < 0:
            return t.service
    return targets[-1].service
