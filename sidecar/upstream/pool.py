"""Connections to one endpoint: reuse, bounds, and waiting for a free one.

``acquire`` hands out an idle connection when one is available (dropping dead ones
first), opens a new one while under ``max_connections``, and otherwise queues the caller,
at most ``max_pending`` deep: past that it refuses at once (503 ``UO``) rather than let a
queue grow. ``release`` gives a connection back (kept while under ``max_idle``, closed after
``idle_timeout``) or passes it straight to the oldest waiter.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable

from ..config.model import Address, PoolConfig
from ..errors import UpstreamConnectError, UpstreamOverflow, UpstreamTimeout
from .circuit_breaker import CircuitBreaker, Limit
from .upstream_connection import UpstreamConnection

__all__ = ["Pool"]


class Pool:
    def __init__(self, address: Address, config: PoolConfig, loop: asyncio.AbstractEventLoop,
                 *, ssl_context: Callable[[], ssl.SSLContext | None] = lambda: None,
                 server_hostname: str | None = None,
                 identify: Callable[[object], str | None] | None = None,
                 on_connect_failure: Callable[[], None] = lambda: None,
                 read_buffer: bytearray | None = None) -> None:
        self.address = address
        self.address_text = f"{address[0]}:{address[1]}"
        self.config = config
        self._loop = loop
        self._ssl_context = ssl_context
        self._server_hostname = server_hostname
        self.identify = identify  # transport -> the peer's SPIFFE ID (mTLS), once per connection
        # upstream connections read into one buffer (one callback at a time on the loop)
        self.read_buffer = read_buffer if read_buffer is not None else bytearray(256 * 1024)
        self._on_connect_failure = on_connect_failure
        self.idle: deque[UpstreamConnection] = deque()
        self.connections = 0  # open or opening
        self.waiters: deque[asyncio.Future[UpstreamConnection | None]] = deque()
        self.closed = False
        self.breaker: CircuitBreaker | None = None  # the cluster's limits (set by ClusterManager)

    def __repr__(self) -> str:
        return (f"<Pool {self.address_text} connections={self.connections} idle={len(self.idle)}"
                f" pending={len(self.waiters)}>")

    def take_idle(self) -> UpstreamConnection | None:
        """An idle, live connection at once, or None (dead ones are dropped on the way)."""
        idle = self.idle
        while idle:
            conn = idle.pop()  # the most recently used one is the most likely alive
            if conn.is_available():
                return conn
            conn.close()
        return None

    async def acquire(self, connect_timeout: float) -> tuple[UpstreamConnection, bool]:
        """A connection to send one request on, and whether it was reused."""
        conn = self.take_idle()
        if conn is not None:
            return conn, True
        if self.connections < self.config.max_connections:
            return await self._connect(connect_timeout), False
        if len(self.waiters) >= self.config.max_pending:
            raise UpstreamOverflow(f"{self.address_text}: {len(self.waiters)} requests already wait"
                                   f" for a connection (max_pending)")
        pending = self.breaker.pending if self.breaker is not None else None
        if pending is not None and not pending.try_acquire():
            raise UpstreamOverflow(f"cluster {self.breaker.name}: too many requests wait for a"  # type: ignore[union-attr]
                                   f" connection (max_pending {pending.max})")
        waiter: asyncio.Future[UpstreamConnection | None] = self._loop.create_future()
        self.waiters.append(waiter)
        try:
            conn = await waiter
        finally:
            if pending is not None:
                pending.release()
            if waiter in self.waiters:
                self.waiters.remove(waiter)
        if conn is None:  # a slot freed up: open our own
            return await self._connect(connect_timeout), False
        return conn, True

    async def _connect(self, timeout: float) -> UpstreamConnection:
        limit = self.breaker.connections if self.breaker is not None else None
        if limit is not None and not limit.try_acquire():
            raise UpstreamOverflow(f"cluster {self.breaker.name}: connection limit reached"  # type: ignore[union-attr]
                                   f" (max_connections {limit.max})")
        self.connections += 1
        host, port = self.address
        try:
            async with asyncio.timeout(timeout):
                context = self._ssl_context()
                _, conn = await self._loop.create_connection(
                    lambda: UpstreamConnection(self, self._loop), host, port, ssl=context,
                    server_hostname=self._server_hostname if context else None)
        except TimeoutError:
            self._lost_slot(limit)
            self._on_connect_failure()
            raise UpstreamConnectError(f"connect to {self.address_text} timed out after {timeout}s") from None
        except OSError as exc:
            self._lost_slot(limit)
            self._on_connect_failure()
            reason = exc.strerror or type(exc).__name__
            raise UpstreamConnectError(f"connect to {self.address_text} failed: {reason}") from None
        except BaseException:
            self._lost_slot(limit)
            raise
        conn.limit = limit
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        """The exchange is done with ``conn``; reuse it or let it go."""
        if not conn.finish():
            return  # closed; connection_lost frees the slot
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        if self.closed or len(self.idle) >= self.config.max_idle:
            conn.close()
            return
        conn.arm_idle_timer(self.config.idle_timeout)
        self.idle.append(conn)

    def put_back(self, conn: UpstreamConnection) -> None:
        """An unused connection (its exchange ended while it was being opened)."""
        conn.reusable = True
        self.release(conn)

    def on_connection_lost(self, conn: UpstreamConnection) -> None:
        try:
            self.idle.remove(conn)
        except ValueError:
            pass
        self._lost_slot(conn.limit)

    def _lost_slot(self, limit: Limit | None) -> None:
        self.connections -= 1
        if limit is not None:
            limit.release()
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the waiter may open a connection now
                return

    def close(self) -> None:
        """Stop reusing: idle connections close now, busy ones when their exchange ends."""
        self.closed = True
        while self.idle:
            self.idle.pop().close()
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_exception(UpstreamTimeout("pool closed"))
