"""A downstream connection cannot hold the sidecar's memory or a connection slot forever
(issue 8): pipelined requests past ``max_pipelined`` stay unparsed bytes, a body that a
filter waits for is under the route timeout, and a tunnel after a 101 under its idle
timeout. Real sidecars, raw sockets, scripted upstreams on 127.0.0.1 port 0."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httptools
import pytest

from tests.helpers.sidecar_process import SidecarProcess

TIMEOUT = 10.0


class _HeldConn(asyncio.Protocol):
    """One upstream connection: requests are answered (body = path) once ``release`` is set."""

    def __init__(self, owner: HeldUpstream) -> None:
        self.owner = owner
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.tunnel = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.owner.open.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.open.discard(self)
        if self.tunnel:
            self.owner.tunnels_closed += 1

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.tunnel:
            self.transport.write(data)  # an echo tunnel
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.tunnel = True
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n"
                                 b"Upgrade: echo\r\n\r\n" + data[exc.args[0]:])

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        path, self.url = self.url, b""
        if self.parser.should_upgrade():
            return
        self.owner.seen += 1
        asyncio.ensure_future(self._answer(path))

    async def _answer(self, path: bytes) -> None:
        await self.owner.release.wait()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(path), path))


class HeldUpstream:
    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.seen = 0
        self.tunnels_closed = 0
        self.open: set[_HeldConn] = set()
        self.server: asyncio.Server | None = None
        self.address = ""

    async def __aenter__(self) -> HeldUpstream:
        self.server = await asyncio.get_running_loop().create_server(lambda: _HeldConn(self), "127.0.0.1", 0)
        self.address = "127.0.0.1:%d" % self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for conn in list(self.open):
            assert conn.transport is not None
            conn.transport.close()
        await self.server.wait_closed()


async def wait_until(condition: object, timeout: float = TIMEOUT) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.01)


def rss_kib(sc: SidecarProcess) -> int:
    assert sc.proc is not None
    with open(f"/proc/{sc.proc.pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def flood(count: int, start: int = 0) -> bytes:
    return b"".join(b"GET /%d HTTP/1.1\r\nHost: echo\r\n\r\n" % i for i in range(start, start + count))


@pytest.fixture
async def held(tmp_path: Path) -> AsyncIterator[tuple[SidecarProcess, HeldUpstream]]:
    async with HeldUpstream() as up, SidecarProcess(
            tmp_path, bootstrap={"service": "echo", "timeouts": {"tunnel_idle": "600ms", "drain": "1s"}},
            mesh={"services": {"echo": {"endpoints": [up.address], "timeouts": {"route": "30s"}}}}) as sc:
        yield sc, up


async def test_a_flood_of_pipelined_requests_does_not_grow_the_sidecar(
        held: tuple[SidecarProcess, HeldUpstream]) -> None:
    """20 connections each write 256 KiB of tiny pipelined requests while the upstream holds
    its answers: each connection parses max_pipelined + 1 of them, not ~8,000."""
    sc, up = held
    port = sc.ports["outbound"]
    payload = flood(8192)[:256 * 1024]
    # warm up: the first exchange imports and allocates what every later one reuses
    up.release.set()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(flood(1))
    await reader.readuntil(b"/0")
    writer.close()
    up.release.clear()
    before = rss_kib(sc)
    writers = []
    for _ in range(20):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(payload)
        writers.append(writer)
    await wait_until(lambda: up.seen >= 1 + 20)  # each connection's first request is upstream
    await asyncio.gather(*(w.drain() for w in writers))  # the sidecar took what the kernel holds
    grown = rss_kib(sc) - before
    print(f"RSS growth for 20 flooding connections: {grown} KiB")
    up.release.set()
    for writer in writers:
        writer.close()
    # on the unbounded parser: 190-370 MB for these 20 connections
    assert grown < 40 * 1024, f"RSS grew by {grown} KiB"


async def test_held_pipelined_requests_are_all_answered_in_order(
        held: tuple[SidecarProcess, HeldUpstream]) -> None:
    sc, up = held
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.ports["outbound"], limit=1 << 20)
    writer.write(flood(3000))
    await wait_until(lambda: up.seen >= 1)
    up.release.set()
    async with asyncio.timeout(TIMEOUT):
        for i in range(3000):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 "), head
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            assert await reader.readexactly(length) == b"/%d" % i
    writer.close()


async def test_a_stalled_body_a_filter_waits_for_gets_408_at_the_route_timeout(tmp_path: Path) -> None:
    """A slowloris on a validated route: headers and part of the body, then nothing."""
    async with HeldUpstream() as app:
        app.release.set()
        boot = {"service": "orders", "app": app.address,
                "timeouts": {"idle": "300ms", "request_headers": "300ms"},
                "listeners": {"inbound": {"address": "127.0.0.1:0", "tls": False}, "admin": "127.0.0.1:0"}}
        mesh = {"services": {"orders": {"endpoints": [], "timeouts": {"route": "600ms"}, "routes": [
            {"name": "checked", "to": [{"service": "orders"}],
             "validation": {"json_schema": {"type": "object"}}}]}}}
        async with SidecarProcess(tmp_path, bootstrap=boot, mesh=mesh) as sc:
            reader, writer = await asyncio.open_connection("127.0.0.1", sc.ports["inbound"])
            writer.write(b'POST /o HTTP/1.1\r\nHost: orders\r\nContent-Type: application/json\r\n'
                         b'Content-Length: 100\r\n\r\n{"item": ')
            start = time.monotonic()
            async with asyncio.timeout(TIMEOUT):
                answer = await reader.read()  # until the sidecar closes
            elapsed = time.monotonic() - start
            writer.close()
            access = await sc.wait_for_event("access")
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"connection: close" in answer.lower()
    assert b'"error":"request_timeout"' in answer and b"route timeout" in answer
    assert 0.5 <= elapsed < 3.0, elapsed
    assert access[-1]["flags"] == "DPE" and access[-1]["status"] == 408
    assert app.seen == 0, "nothing of the stalled request reached the app"


async def _upgrade(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /t HTTP/1.1\r\nHost: echo\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert head.startswith(b"HTTP/1.1 101 "), head
    return reader, writer


async def test_an_idle_tunnel_is_closed_on_both_sides(held: tuple[SidecarProcess, HeldUpstream]) -> None:
    sc, up = held
    reader, writer = await _upgrade(sc.ports["outbound"])
    start = time.monotonic()
    async with asyncio.timeout(TIMEOUT):
        assert await reader.read() == b""
    elapsed = time.monotonic() - start
    writer.close()
    assert 0.5 <= elapsed < 3.0, elapsed
    await wait_until(lambda: up.tunnels_closed == 1)  # the upstream side is closed too


async def test_a_tunnel_in_use_either_way_stays_open(held: tuple[SidecarProcess, HeldUpstream]) -> None:
    sc, up = held
    reader, writer = await _upgrade(sc.ports["outbound"])
    start = time.monotonic()
    while time.monotonic() - start < 1.2:  # twice the idle timeout, a message every 200 ms
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), TIMEOUT) == b"ping"
        await asyncio.sleep(0.2)
    # only the upstream speaks now: it keeps the tunnel open as well
    conn = next(iter(up.open))
    for _ in range(4):
        assert conn.transport is not None
        conn.transport.write(b"push")
        assert await asyncio.wait_for(reader.readexactly(4), TIMEOUT) == b"push"
        await asyncio.sleep(0.2)
    assert up.tunnels_closed == 0
    async with asyncio.timeout(TIMEOUT):  # then silence: closed
        assert await reader.read() == b""
    writer.close()
