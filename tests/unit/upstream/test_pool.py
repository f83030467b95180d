"""The pool's hand-over, cancellation and close paths, on a fake network (no sockets).

Like httpcore's pool tests: the fake ``create_connection`` resolves only when the test says
so (``accept`` / ``refuse``), and a fake transport delivers ``connection_lost`` as asyncio
does (``call_soon`` after ``close``), so a test decides exactly which futures resolve and
which tasks are cancelled within one loop tick. Each race below lost a connection, a slot
or a bound on the pool as it was.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import pytest

from sidecar.config.model import PoolConfig
from sidecar.config.resilience import BreakerConfig
from sidecar.errors import UpstreamConnectError, UpstreamOverflow, UpstreamTimeout
from sidecar.upstream.circuit_breaker import CircuitBreaker
from sidecar.upstream.pool import Pool
from sidecar.upstream.upstream_connection import UpstreamConnection


class FakeTransport:
    """Collects writes; ``close`` delivers ``connection_lost`` on the next callback round,
    ``peer_close`` at once (as when EOF is read)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: UpstreamConnection) -> None:
        self._loop = loop
        self.protocol = protocol
        self.written = bytearray()
        self.closing = False
        self.lost = False

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self._loop.call_soon(self._lose)

    def abort(self) -> None:
        self.close()

    def peer_close(self) -> None:
        self.closing = True
        self._lose()

    def _lose(self) -> None:
        if not self.lost:
            self.lost = True
            self.protocol.connection_lost(None)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass


class Connect:
    """One ``create_connection`` in flight, resolved by the test."""

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: UpstreamConnection) -> None:
        self._loop = loop
        self.protocol = protocol
        self.future: asyncio.Future[None] = loop.create_future()
        self.transport: FakeTransport | None = None

    def accept(self) -> FakeTransport:
        """As asyncio: ``connection_made``, then the connect's own future resolves."""
        transport = self.transport = FakeTransport(self._loop, self.protocol)
        self.protocol.connection_made(transport)  # type: ignore[arg-type]
        self.future.set_result(None)
        return transport

    def refuse(self) -> None:
        self.future.set_exception(ConnectionRefusedError(111, "Connection refused"))


class FakeNetwork:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.connects: deque[Connect] = deque()  # in flight, oldest first
        self.opened = 0  # create_connection calls

    async def create_connection(self, factory: Callable[[], UpstreamConnection], host: str, port: int,
                                **_: Any) -> tuple[FakeTransport, UpstreamConnection]:
        protocol = factory()
        attempt = Connect(self._loop, protocol)
        self.connects.append(attempt)
        self.opened += 1
        try:
            await attempt.future
        except BaseException:
            if attempt.transport is not None:  # cancelled after the transport was made
                attempt.transport.close()
            raise
        finally:
            if attempt in self.connects:
                self.connects.remove(attempt)
        assert attempt.transport is not None
        return attempt.transport, protocol

    def next(self) -> Connect:
        return self.connects[0]


class FakeLoop:
    """The running loop, with ``create_connection`` going to the fake network."""

    def __init__(self, loop: asyncio.AbstractEventLoop, network: FakeNetwork) -> None:
        self._loop = loop
        self.create_connection = network.create_connection

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)


def serve(conn: UpstreamConnection) -> None:
    """What one exchange that ended with a keep-alive response leaves on ``conn``: it may be
    reused. (``start`` takes the listener's ``Stream``, a native class once compiled: how a
    response reaches it, and makes the connection reusable or not, is tested end to end in
    tests/integration/test_http_proxying.py.)"""
    conn.requests += 1
    conn.reusable = True


def transport_of(conn: UpstreamConnection) -> FakeTransport:
    return cast(FakeTransport, conn.transport)


async def settle(rounds: int = 10) -> None:
    """Run every callback and task step already due (no timers, no sleeping)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


class Setup:
    def __init__(self, *, max_connections: int = 1, max_pending: int = 8, max_idle: int = 4,
                 breaker: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self.net = FakeNetwork(loop)
        self.failures = 0
        self.pool = Pool(("10.0.0.1", 80), PoolConfig(max_connections=max_connections, max_idle=max_idle,
                                                      max_pending=max_pending),
                         cast(asyncio.AbstractEventLoop, FakeLoop(loop, self.net)),
                         on_connect_failure=self._failed)
        self.breaker: CircuitBreaker | None = None
        if breaker:
            self.breaker = CircuitBreaker(BreakerConfig(max_connections=max_connections,
                                                        max_pending=max_pending), name="orders")
            self.pool.breaker = self.breaker

    def _failed(self) -> None:
        self.failures += 1

    def acquire(self, timeout: float = 5.0) -> asyncio.Task[tuple[UpstreamConnection, bool]]:
        return asyncio.get_running_loop().create_task(self.pool.acquire(timeout))

    async def open_one(self) -> UpstreamConnection:
        """A connection in use by an exchange (the pool's only slot when max_connections=1)."""
        task = self.acquire()
        await settle()
        self.net.next().accept()
        conn, reused = await task
        assert not reused
        return conn

    async def waiting(self, n: int = 1) -> list[asyncio.Task[tuple[UpstreamConnection, bool]]]:
        tasks = [self.acquire() for _ in range(n)]
        await settle()
        assert len(self.pool.waiters) == n and not any(t.done() for t in tasks)
        return tasks


# === hand-over ===============================================================================
async def test_release_hands_the_connection_to_the_oldest_waiter() -> None:
    s = Setup()
    conn = await s.open_one()
    first, second = await s.waiting(2)
    serve(conn)
    s.pool.release(conn)
    assert await first == (conn, True)
    assert not second.done() and s.pool.connections == 1 and not s.pool.idle
    second.cancel()
    await settle()
    assert not s.pool.waiters


async def test_put_back_hands_an_unused_connection_to_a_waiter() -> None:
    s = Setup()
    conn = await s.open_one()  # its exchange ended while it was opened: never started
    waiter, = await s.waiting()
    s.pool.put_back(conn)
    assert await waiter == (conn, True)


async def test_waiter_cancelled_in_the_tick_it_is_handed_a_connection_gives_it_back() -> None:
    s = Setup()
    conn = await s.open_one()
    waiter, = await s.waiting()
    serve(conn)
    s.pool.release(conn)  # waiter's future resolves ...
    waiter.cancel()       # ... and its route deadline fires before it resumes
    await settle()
    assert waiter.cancelled()
    assert list(s.pool.idle) == [conn] and s.pool.connections == 1
    # the next exchange gets it at once instead of waiting for the upstream to close it
    assert await asyncio.wait_for(s.pool.acquire(5.0), 1.0) == (conn, True)
    assert s.net.opened == 1


async def test_waiter_cancelled_in_the_tick_it_is_handed_a_connection_passes_it_to_the_next() -> None:
    s = Setup()
    conn = await s.open_one()
    first, second = await s.waiting(2)
    serve(conn)
    s.pool.release(conn)
    first.cancel()
    await settle()
    assert first.cancelled()
    assert second.done() and second.result() == (conn, True)


async def test_waiter_cancelled_in_the_tick_it_is_handed_a_slot_passes_it_on() -> None:
    s = Setup(breaker=True)
    conn = await s.open_one()
    first, second = await s.waiting(2)
    transport_of(conn).peer_close()  # the slot goes to the first waiter ...
    first.cancel()                   # ... which is cancelled before it can use it
    await settle()
    assert first.cancelled()
    assert len(s.net.connects) == 1, "the second waiter opens a connection on the passed slot"
    s.net.next().accept()
    new, reused = await second
    assert not reused and new is not conn
    assert s.pool.connections == 1 and s.breaker is not None and s.breaker.connections.current == 1
    assert s.breaker.pending.current == 0


async def test_a_slot_handed_to_a_waiter_is_not_taken_by_a_newcomer() -> None:
    s = Setup()
    conn = await s.open_one()
    waiter, = await s.waiting()
    newcomer = s.acquire()           # its first step is due before the waiter resumes
    transport_of(conn).peer_close()  # frees the only slot: the waiter was promised it
    await settle()
    assert s.net.opened == 2, "one connection at a time (max_connections=1)"
    assert len(s.net.connects) == 1 and s.pool.connections == 1
    s.net.next().accept()
    new, _ = await waiter
    assert not newcomer.done()
    serve(new)
    s.pool.release(new)
    assert await newcomer == (new, True)


async def test_connection_closed_between_hand_over_and_resume_is_not_handed_out() -> None:
    s = Setup()
    conn = await s.open_one()
    waiter, = await s.waiting()
    serve(conn)
    s.pool.release(conn)            # handed to the waiter ...
    transport_of(conn).peer_close()  # ... and the upstream closes it in the same tick
    await settle()
    assert not waiter.done() and len(s.net.connects) == 1, "the waiter opens a fresh connection"
    s.net.next().accept()
    new, reused = await waiter
    assert new is not conn and not new.closed and not reused
    assert s.pool.connections == 1


# === connect =================================================================================
async def test_connect_cancelled_after_the_transport_was_made_frees_its_slot_once() -> None:
    s = Setup(breaker=True)
    task = s.acquire()
    await settle()
    s.net.next().accept()  # connected ...
    task.cancel()          # ... but the client went away before the task resumed
    await settle()         # the loop closes the transport; connection_lost arrives
    assert task.cancelled()
    assert s.pool.connections == 0
    assert s.breaker is not None and s.breaker.connections.current == 0
    # the bound still holds: one connection, the next request waits for it
    first = s.acquire()
    second = s.acquire()
    await settle()
    assert len(s.net.connects) == 1 and len(s.pool.waiters) == 1
    s.net.next().accept()
    conn, _ = await first
    serve(conn)
    s.pool.release(conn)
    assert await second == (conn, True)


async def test_connect_that_times_out_frees_its_slot_and_counts_a_failure() -> None:
    s = Setup(breaker=True)
    task = s.acquire(timeout=0.0)  # the deadline fires on the next callback round
    waiter = s.acquire()
    await asyncio.sleep(0)  # one round: the connect starts, the second request queues
    assert len(s.net.connects) == 1 and len(s.pool.waiters) == 1
    with pytest.raises(UpstreamConnectError, match="timed out"):
        await task
    assert s.failures == 1
    await settle()
    assert len(s.net.connects) == 1, "the slot went to the waiter"
    s.net.next().accept()
    conn, reused = await waiter
    assert not reused and s.pool.connections == 1
    assert s.breaker is not None and s.breaker.connections.current == 1


async def test_refused_connect_passes_its_slot_to_a_waiter() -> None:
    s = Setup()
    task = s.acquire()
    waiter, = await s.waiting()
    s.net.next().refuse()
    with pytest.raises(UpstreamConnectError, match="Connection refused"):
        await task
    assert s.failures == 1
    await settle()
    s.net.next().accept()
    _, reused = await waiter
    assert not reused and s.pool.connections == 1


async def test_connection_lost_before_connect_returns_is_a_failure_not_a_member() -> None:
    s = Setup(breaker=True)
    task = s.acquire()
    await settle()
    s.net.next().accept().peer_close()  # made and lost before the connect resumed
    with pytest.raises(UpstreamConnectError):
        await task
    await settle()
    assert s.pool.connections == 0
    assert s.breaker is not None and s.breaker.connections.current == 0


async def test_connection_limit_of_the_cluster_refuses_and_frees_the_slot() -> None:
    s = Setup(max_connections=2, breaker=True)
    assert s.breaker is not None
    s.breaker.connections.max = 0  # another pool of the cluster holds them all
    with pytest.raises(UpstreamOverflow, match="connection limit"):
        await s.pool.acquire(5.0)
    assert s.pool.connections == 0 and s.net.opened == 0


# === waiting bounds ==========================================================================
async def test_max_pending_refuses_at_once_and_cancelled_waiters_free_their_pending_slot() -> None:
    s = Setup(max_pending=2, breaker=True)
    await s.open_one()
    waiters = await s.waiting(2)
    with pytest.raises(UpstreamOverflow, match="max_pending"):
        await s.pool.acquire(5.0)
    assert s.breaker is not None and s.breaker.pending.current == 2
    for waiter in waiters:
        waiter.cancel()
    await settle()
    assert s.breaker.pending.current == 0 and not s.pool.waiters
    assert s.pool.connections == 1


# === idle ====================================================================================
async def test_connection_lost_while_idle_leaves_the_pool_and_frees_its_slot() -> None:
    s = Setup()
    conn = await s.open_one()
    serve(conn)
    s.pool.release(conn)
    assert list(s.pool.idle) == [conn]
    transport_of(conn).peer_close()
    assert not s.pool.idle and s.pool.connections == 0
    task = s.acquire()
    await settle()
    s.net.next().accept()
    new, reused = await task
    assert new is not conn and not reused


# === close ===================================================================================
async def test_close_fails_waiters_closes_idle_and_frees_every_limit_once() -> None:
    s = Setup(max_connections=2, breaker=True)
    busy = await s.open_one()
    idle = await s.open_one()
    serve(idle)
    s.pool.release(idle)
    serve(busy)
    # both slots taken again, so the next ones wait
    again, reused = await s.pool.acquire(5.0)
    assert again is idle and reused
    busy_transport, again_transport = transport_of(busy), transport_of(again)
    waiters = await s.waiting(2)
    s.pool.close()
    for waiter in waiters:
        with pytest.raises(UpstreamTimeout, match="pool closed"):
            await waiter
    assert s.breaker is not None and s.breaker.pending.current == 0
    s.pool.release(busy)  # a busy connection closes when its exchange ends
    serve(again)
    s.pool.release(again)
    await settle()
    assert busy_transport.lost and again_transport.lost
    assert busy.transport is None and again.transport is None  # let go of once lost
    assert s.pool.connections == 0 and s.breaker.connections.current == 0 and not s.pool.idle


async def test_close_in_the_tick_a_waiter_was_handed_a_connection() -> None:
    s = Setup(breaker=True)
    conn = await s.open_one()
    transport = transport_of(conn)
    waiter, = await s.waiting()
    serve(conn)
    s.pool.release(conn)
    s.pool.close()
    got, reused = await waiter  # it was the waiter's already: it serves this one exchange
    assert got is conn and reused
    serve(got)
    s.pool.release(got)
    await settle()
    assert transport.lost and s.pool.connections == 0
    assert s.breaker is not None and s.breaker.connections.current == 0 and s.breaker.pending.current == 0


async def test_waiter_cancelled_in_the_tick_the_pool_closed() -> None:
    s = Setup(breaker=True)
    await s.open_one()
    waiter, = await s.waiting()
    s.pool.close()
    waiter.cancel()
    await settle()
    assert waiter.cancelled()
    assert s.breaker is not None and s.breaker.pending.current == 0 and not s.pool.waiters
