"""Slow and idle clients cannot take the sidecar's memory or its latency (issue 12).

Real sidecar processes; the slow clients are Python coroutines in this test. Memory is the
sidecar's RSS from /proc (before/after); the per-connection figures printed here are the
ones docs/operations.md reports ("What a connection costs").
"""

from __future__ import annotations

import asyncio
import resource
import ssl
import time
from pathlib import Path
from typing import Any, cast

from tests.helpers.pki import make_test_pki
from tests.helpers.sidecar_process import SidecarProcess
from tests.helpers.upstreams import RecordingUpstream

MESH: dict[str, Any] = {"services": {"app": {"endpoints": [], "timeouts": {"route": "1s"}}, "frontend": {"endpoints": []}}}
IDLE_MESH: dict[str, Any] = {"services": {"app": {"endpoints": []}, "frontend": {"endpoints": []}}}  # 15 s route timeout
GET = b"GET / HTTP/1.1\r\nhost: app\r\n\r\n"


def _rss(sc: SidecarProcess) -> int:
    assert sc.proc is not None
    status = Path(f"/proc/{sc.proc.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024


def _raise_fd_limit(want: int) -> None:
    """This process and the sidecar it starts (which inherits the limit) need ``want`` fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= want, "the fd limit is too low for this test"


def _sidecar(tmp_path: Path, app: RecordingUpstream, mesh: dict[str, Any] = MESH,
             **extra: object) -> SidecarProcess:
    return SidecarProcess(tmp_path, mesh=mesh, bootstrap={
        "service": "app", "app": app.address, "access_log": {"enabled": False},
        "listeners": {"inbound": {"address": "127.0.0.1:0", "tls": False}, "admin": "127.0.0.1:0"},
        **extra})


async def _response(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    return head + await reader.readexactly(length)  # the body of a local reply says why


async def _latencies(port: int, n: int) -> list[float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = []
    for _ in range(n):
        start = time.perf_counter()
        writer.write(GET)
        assert (await _response(reader)).startswith(b"HTTP/1.1 200")
        out.append(time.perf_counter() - start)
    writer.close()
    return out


def _p99(values: list[float]) -> float:
    return sorted(values)[int(len(values) * 0.99) - 1]


async def test_slowloris_connections_are_closed_by_the_header_timeout_and_others_stay_fast(tmp_path: Path) -> None:
    _raise_fd_limit(4096)
    async with RecordingUpstream() as app:
        async with _sidecar(tmp_path, app, timeouts={"request_headers": "1500ms"}) as sc:
            port = sc.ports["inbound"]
            await _latencies(port, 50)  # warm up
            baseline = _p99(await _latencies(port, 300))
            conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(1000)]
            started = time.monotonic()
            answers: list[bytes] = []

            async def trickle() -> None:  # one header byte per connection every 500 ms
                # Spread over the 500 ms in batches of 50, as unsynchronised attackers would be:
                # 1,000 writes in one loop turn would stall this process's own latency probe
                # (the same loop) and measure the test client, not the sidecar.
                for byte in b"GET / HTTP/1.1\r\nhost: app\r\nx-slow: " + b"a" * 100:
                    for first in range(0, len(conns), 50):
                        for _, writer in conns[first:first + 50]:
                            if not writer.is_closing():
                                writer.write(bytes([byte]))
                        await asyncio.sleep(0.5 * 50 / len(conns))

            async def closed(reader: asyncio.StreamReader) -> None:
                try:
                    answers.append(await asyncio.wait_for(reader.read(), 10))
                except ConnectionError:
                    answers.append(b"reset")

            sender = asyncio.create_task(trickle())
            during = _p99(await _latencies(port, 300))
            await asyncio.gather(*(closed(reader) for reader, _ in conns))
            elapsed = time.monotonic() - started
            sender.cancel()
            for _, writer in conns:
                writer.close()
    assert sum(a.startswith(b"HTTP/1.1 408") for a in answers) == 1000, set(a[:20] for a in answers)
    assert elapsed < 1.5 + 2.0, f"the slow connections took {elapsed:.1f}s to be closed"
    print(f"\nslowloris: normal client p99 {baseline * 1e3:.2f} ms alone, {during * 1e3:.2f} ms during")
    # 2x, with 5 ms for the scheduler of a shared 2-core VM (one 10 ms steal stall among 300
    # requests is their p99); a sidecar that let slow clients hold up others would add far more
    assert during < 2 * baseline + 0.005, f"p99 {during * 1e3:.2f} ms vs {baseline * 1e3:.2f} ms alone"


async def test_slow_body_senders_and_slow_readers_leave_memory_flat(tmp_path: Path) -> None:
    _raise_fd_limit(4096)
    big = b"x" * (4 << 20)
    response = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(big), big)
    async with RecordingUpstream(response) as app:
        async with _sidecar(tmp_path, app) as sc:
            port = sc.ports["inbound"]
            for _ in range(3):  # warm up the allocator on both paths
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(GET)
                await _response(reader)
                writer.close()
            before = _rss(sc)
            slow_bodies = [await asyncio.open_connection("127.0.0.1", port) for _ in range(200)]
            for _, writer in slow_bodies:  # 10 MB announced, 1 KiB sent, then nothing
                writer.write(b"POST /up HTTP/1.1\r\nhost: app\r\ncontent-length: 10485760\r\n\r\n" + b"b" * 1024)
            slow_readers = [await asyncio.open_connection("127.0.0.1", port) for _ in range(200)]
            for _, writer in slow_readers:  # 4 MiB asked for, never read
                cast(asyncio.Transport, writer.transport).pause_reading()
                writer.write(GET)
            await asyncio.sleep(0.5)
            peak = _rss(sc)

            async def ended(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                cast(asyncio.Transport, writer.transport).resume_reading()
                try:
                    while await asyncio.wait_for(reader.read(1 << 20), 10):
                        pass
                except ConnectionError:
                    pass

            started = time.monotonic()
            await asyncio.gather(*(ended(r, w) for r, w in slow_bodies))
            bodies_closed = time.monotonic() - started
            for reader, writer in slow_readers:
                writer.transport.abort()
                writer.close()
            after = _rss(sc)
            for _, writer in slow_bodies:
                writer.close()
    print(f"\nslow clients: RSS {before >> 20} MiB before, {peak >> 20} MiB with 400 slow connections, "
          f"{after >> 20} MiB after")
    # Unbounded buffering would hold 200 x 4 MiB of responses (800 MiB). The sidecar holds, for
    # each slow reader, what its transport took before it paused the upstream (64 KiB, the
    # high-water mark) and the upstream read that crossed it, kept whole until sent: uvloop
    # reads up to ~250 KiB at a time. ~320 KiB each, 62.5 MiB for 200. Measured 65-77 MiB on
    # one VM (the heap keeps what it freed), for this code and for the code before the heap
    # pad's threshold fix (39bb91a); the earlier bound, 48 MiB, had held on the machines
    # before it. This one leaves the allocator half as much again.
    assert max(peak, after) - before < 96 << 20, f"RSS grew by {(max(peak, after) - before) >> 20} MiB"
    assert bodies_closed < 5.0  # the route timeout (1 s) ends a stalled upload: 504, closed


async def _idle(port: int, n: int, ctx: ssl.SSLContext | None = None
                ) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """``n`` keep-alive connections, each after one answered request, left idle."""
    sem = asyncio.Semaphore(200)

    async def one() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        async with sem:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                                           server_hostname="" if ctx else None)
            writer.write(GET)
            response = await _response(reader)
            assert response.startswith(b"HTTP/1.1 200"), response
            return reader, writer

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def test_ten_thousand_idle_keep_alive_connections(tmp_path: Path) -> None:
    _raise_fd_limit(12_000)
    n = 10_000
    async with RecordingUpstream() as app:
        async with _sidecar(tmp_path, app, IDLE_MESH, limits={"max_connections": 12_000}) as sc:
            port = sc.ports["inbound"]
            warm = await _idle(port, 200)
            before = _rss(sc)
            conns = await _idle(port, n)
            after = _rss(sc)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(GET)  # still serving
            assert (await _response(reader)).startswith(b"HTTP/1.1 200")
            writer.close()
            for _, w in (*warm, *conns):
                w.close()
    per = (after - before) / n
    print(f"\n{n} idle plain connections: {(after - before) >> 20} MiB, {per / 1024:.1f} KiB each")
    assert per < 16 * 1024, f"{per / 1024:.1f} KiB per idle connection"


async def test_a_thousand_idle_mtls_connections(tmp_path: Path) -> None:
    _raise_fd_limit(4096)
    n = 1000
    pki = make_test_pki(tmp_path / "pki", services=["app", "frontend"])
    files, client = pki.services["app"], pki.services["frontend"]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=client.bundle)
    ctx.load_cert_chain(client.cert, client.key)
    async with RecordingUpstream() as app:
        sc = SidecarProcess(tmp_path, mesh=IDLE_MESH, bootstrap={
            "service": "app", "app": app.address, "access_log": {"enabled": False},
            "tls": {"cert": str(files.cert), "key": str(files.key), "bundle": str(files.bundle)},
            "listeners": {"inbound": {"address": "127.0.0.1:0", "tls": True}, "admin": "127.0.0.1:0"}})
        async with sc:
            port = sc.ports["inbound"]
            warm = await _idle(port, 100, ctx)
            before = _rss(sc)
            conns = await _idle(port, n, ctx)
            after = _rss(sc)
            for _, w in (*warm, *conns):
                w.close()
    per = (after - before) / n
    print(f"\n{n} idle mTLS connections: {(after - before) >> 20} MiB, {per / 1024:.1f} KiB each")
    assert per < 96 * 1024, f"{per / 1024:.1f} KiB per idle mTLS connection"
