"""Connections to one endpoint: reuse, bounds, and waiting for a free one.

``acquire`` hands out an idle connection when one is available (dropping dead ones
first), opens a new one while under ``max_connections``, and otherwise queues the caller,
at most ``max_pending`` deep: past that it refuses at once (503 ``UO``) rather than let a
queue grow. ``release`` gives a connection back (kept while under ``max_idle``, closed after
``idle_timeout``) or passes it straight to the oldest waiter.

Rules that keep the counts true whatever is cancelled when:
- ``connections`` counts slots: open connections, connects in flight, and slots handed to a
  waiter that has not run yet. A slot is taken before the first await and given up exactly
  once: by the failed connect itself, or by ``connection_lost`` of a connection the pool
  holds (``_members``). A connect that fails after its transport was made (cancelled by a
  route deadline or a client gone) never becomes a member, so its late ``connection_lost``
  frees nothing twice.
- What is handed to a waiter (a connection, or a slot to open one with) belongs to it once
  the future resolves. A waiter cancelled before it resumes passes it on: a connection to
  the next waiter or the idle list, a slot to the next waiter or back to the pool.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable

from ..config.model import Address, PoolConfig
from ..errors import UpstreamConnectError, UpstreamOverflow, UpstreamTimeout
from .circuit_breaker import CircuitBreaker, Limit
from .tls_protocol import TlsProtocol
from .upstream_connection import UpstreamConnection

__all__ = ["Pool"]

# What a waiter is handed: a connection to reuse, or None, a slot to open its own with.
_Handed = UpstreamConnection | None


class Pool:
    def __init__(self, address: Address, config: PoolConfig, loop: asyncio.AbstractEventLoop,
                 *, ssl_context: Callable[[], ssl.SSLContext | None] = lambda: None,
                 server_hostname: str | None = None,
                 identify: Callable[[object], str | None] | None = None,
                 on_connect_failure: Callable[[], None] = lambda: None) -> None:
        self.address = address
        self.address_text = f"{address[0]}:{address[1]}"
        self.config = config
        self._loop = loop
        self._ssl_context = ssl_context
        self._server_hostname = server_hostname
        self.identify = identify  # transport -> the peer's SPIFFE ID (mTLS), once per connection
        self._on_connect_failure = on_connect_failure
        # newest last; a list, not a deque: compiled, its pop and append are direct calls
        self.idle: list[UpstreamConnection] = []
        self.connections = 0  # slots: open, opening, or handed to a waiter (see the rules above)
        self._members: set[UpstreamConnection] = set()  # open connections whose slot they hold
        self.waiters: deque[asyncio.Future[_Handed]] = deque()
        self.closed = False
        self.breaker: CircuitBreaker | None = None  # the cluster's limits (set by ClusterManager)

    def __repr__(self) -> str:
        return (f"<Pool {self.address_text} connections={self.connections} idle={len(self.idle)}"
                f" pending={len(self.waiters)}>")

    def take_idle(self) -> UpstreamConnection | None:
        """An idle, live connection at once, or None (dead ones are dropped on the way)."""
        idle = self.idle
        while idle:
            # the most recently used one is the most likely alive; the last one cleared, not
            # popped (see DownstreamConnection.stream_done)
            if len(idle) == 1:
                conn = idle[0]
                idle.clear()
            else:
                conn = idle.pop()
            if conn.is_available():
                return conn
            conn.close()
        return None

    async def acquire(self, connect_timeout: float) -> tuple[UpstreamConnection, bool]:
        """A connection to send one request on, and whether it was reused."""
        while True:
            conn = self.take_idle()
            if conn is not None:
                return conn, True
            if self.connections < self.config.max_connections:
                self.connections += 1  # the slot is ours before the first await
                return await self._connect(connect_timeout), False
            handed = await self._wait()
            if handed is None:  # a slot, kept for us: open our own
                return await self._connect(connect_timeout), False
            if handed.is_available():
                return handed, True
            # it closed between the hand-over and now; its own connection_lost frees its slot
            handed.close()

    async def _wait(self) -> _Handed:
        if len(self.waiters) >= self.config.max_pending:
            raise UpstreamOverflow(f"{self.address_text}: {len(self.waiters)} requests already wait"
                                   f" for a connection (max_pending)")
        breaker = self.breaker
        pending = None
        if breaker is not None:
            pending = breaker.pending
            if pending is not None and not pending.try_acquire():
                raise UpstreamOverflow(f"cluster {breaker.name}: too many requests wait for a"
                                       f" connection (max_pending {pending.max})")
        waiter: asyncio.Future[_Handed] = self._loop.create_future()
        self.waiters.append(waiter)
        try:
            return await waiter
        except BaseException:
            # Cancelled after release() or _free_slot() resolved the future but before this
            # task resumed: what it was handed is ours, and dropping it would lose it.
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._pass_on(waiter.result())
            raise
        finally:
            if pending is not None:
                pending.release()
            if waiter in self.waiters:
                self.waiters.remove(waiter)

    async def _connect(self, timeout: float) -> UpstreamConnection:
        """Open a connection on a slot already counted in ``connections``."""
        breaker = self.breaker
        limit = None
        if breaker is not None:
            limit = breaker.connections
            if limit is not None and not limit.try_acquire():
                self._free_slot()
                raise UpstreamOverflow(f"cluster {breaker.name}: connection limit reached"
                                       f" (max_connections {limit.max})")
        conn = UpstreamConnection(self, self._loop)
        host, port = self.address
        try:
            async with asyncio.timeout(timeout):
                context = self._ssl_context()
                if context is None:
                    await self._loop.create_connection(lambda: conn, host, port)
                else:
                    await self._connect_tls(conn, host, port, context, timeout)
        except BaseException as exc:
            # The transport may exist (cancelled after it was made): the loop closes it, and
            # its connection_lost finds no member, so the slot is freed here, once.
            conn.close()
            self._give_up_slot(limit)
            if isinstance(exc, TimeoutError):
                self._on_connect_failure()
                raise UpstreamConnectError(f"connect to {self.address_text} timed out after {timeout}s") from None
            if isinstance(exc, OSError):
                self._on_connect_failure()
                reason = exc.strerror or type(exc).__name__
                raise UpstreamConnectError(f"connect to {self.address_text} failed: {reason}") from None
            raise
        if conn.closed:  # lost before create_connection returned: its connection_lost freed nothing
            self._give_up_slot(limit)
            self._on_connect_failure()
            raise UpstreamConnectError(f"connection to {self.address_text} closed while it was opened")
        conn.limit = limit
        self._members.add(conn)
        return conn

    async def _connect_tls(self, conn: UpstreamConnection, host: str, port: int,
                           context: ssl.SSLContext, timeout: float) -> None:
        """TCP, then the TLS handshake (``TlsProtocol``); ``conn`` is connected after it."""
        done: asyncio.Future[None] = self._loop.create_future()

        def on_handshake(exc: BaseException | None) -> None:
            if not done.done():
                if exc is None:
                    done.set_result(None)
                else:
                    done.set_exception(exc)

        tls = TlsProtocol(self._loop, conn, context, server_side=False,
                          server_hostname=self._server_hostname, handshake_timeout=timeout,
                          on_handshake=on_handshake, up=conn)
        await self._loop.create_connection(lambda: tls, host, port)
        try:
            await done
        except BaseException:
            tls.abort()  # cancelled (the connect timeout) or refused: the socket goes now
            raise

    def release(self, conn: UpstreamConnection, now: float = -1.0) -> None:
        """The exchange is done with ``conn``; reuse it or let it go. ``now``: the monotonic
        clock's time when the caller read it, else -1.0."""
        if not conn.finish():
            return  # closed; connection_lost frees the slot
        self._hand_over(conn, now)

    def put_back(self, conn: UpstreamConnection) -> None:
        """An unused connection (its exchange ended while it was being opened)."""
        conn.reusable = True
        self.release(conn)

    def on_connection_lost(self, conn: UpstreamConnection) -> None:
        if conn not in self._members:
            return  # never handed out: the failed connect gave its slot up
        self._members.discard(conn)
        try:
            self.idle.remove(conn)
        except ValueError:
            pass
        limit = conn.limit
        self._give_up_slot(limit if isinstance(limit, Limit) else None)

    def close(self) -> None:
        """Stop reusing: idle connections close now, busy ones when their exchange ends;
        waiters fail at once."""
        self.closed = True
        while self.idle:
            self.idle.pop().close()
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_exception(UpstreamTimeout("pool closed"))

    # --- hand-over ------------------------------------------------------------------------
    def _hand_over(self, conn: UpstreamConnection, now: float = -1.0) -> None:
        """A live, reusable connection: to the oldest waiter, else idle (or closed)."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        if self.closed or len(self.idle) >= self.config.max_idle:
            conn.close()
            return
        conn.arm_idle_timer(self.config.idle_timeout, now)
        self.idle.append(conn)

    def _pass_on(self, handed: _Handed) -> None:
        """What a cancelled waiter was handed goes to the next one, or back to the pool."""
        if handed is None:
            self._free_slot()
        elif handed.is_available():
            self._hand_over(handed)
        else:
            handed.close()  # dead already; its connection_lost frees (or freed) its slot

    def _give_up_slot(self, limit: Limit | None) -> None:
        """A connection is gone (or never came): its cluster limit and its pool slot are free."""
        if limit is not None:
            limit.release()
        self._free_slot()

    def _free_slot(self) -> None:
        """Hand a free slot to the oldest waiter, still counted, so that no newcomer can take
        it meanwhile and open one connection past ``max_connections``; else uncount it."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.connections -= 1
