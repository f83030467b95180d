"""A sidecar whose stdout reader stops reading keeps serving (issue 8, "ways to hang it" 1).

Writing log lines on the event loop froze the whole sidecar, admin ``/healthz`` included, once
the stdout pipe was full (about a hundred access lines). Now lines wait on a bounded queue for
a writer thread; what the output cannot take is dropped and counted in
``pake_log_dropped_total``, and what was queued is written when the reader comes back.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path
from typing import Any

import aiohttp

from tests.helpers.sidecar_process import SidecarFailed, SidecarProcess

_ROOT = Path(__file__).resolve().parents[2]
MESH: dict[str, Any] = {"services": {}}  # no service: every request is a local 404 (NR)


class StalledStdoutSidecar(SidecarProcess):
    """A sidecar whose stdout is a pipe the test can stop reading (``stall``) and read again
    (``resume``), as a log shipper that hangs; the kernel's pipe buffer then fills up."""

    _stdout: asyncio.ReadTransport | None = None

    async def start(self) -> StalledStdoutSidecar:
        self.write_config()
        loop = asyncio.get_running_loop()
        read_end, write_end = os.pipe()
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sidecar", "run", "-c", str(self.config_path),
                stdout=write_end, stderr=asyncio.subprocess.PIPE, cwd=str(self.dir),
                env={**os.environ, "PYTHONPATH": str(_ROOT)})
        finally:
            os.close(write_end)
        stdout = asyncio.StreamReader(limit=1 << 20)
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdout),
                                                    os.fdopen(read_end, "rb", buffering=0))
        self._stdout = transport
        self._readers = [asyncio.create_task(self._read(stdout, self.lines)),
                         asyncio.create_task(self._read(self.proc.stderr, self.stderr))]
        waiter = asyncio.create_task(self._ready.wait())  # set by _read on the "ready" line
        exited = asyncio.create_task(self.proc.wait())
        await asyncio.wait({waiter, exited}, timeout=self.ready_timeout, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        exited.cancel()
        if not self._ready.is_set():
            await self.stop()
            raise SidecarFailed(f"sidecar not ready: stderr={self.stderr[-5:]}")
        return self

    def stall(self) -> None:
        assert self._stdout is not None
        self._stdout.pause_reading()

    def resume(self) -> None:
        assert self._stdout is not None
        self._stdout.resume_reading()

    async def __aenter__(self) -> StalledStdoutSidecar:
        return await self.start()


async def _get_many(port: int, target: str, count: int) -> list[int]:
    """``count`` requests on one keep-alive connection, one at a time; their statuses."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    statuses = []
    request = f"GET {target} HTTP/1.1\r\nHost: nowhere.test\r\n\r\n".encode()
    try:
        for _ in range(count):
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
            await reader.readexactly(length)
            statuses.append(int(head.split()[1]))
    finally:
        writer.close()
    return statuses


async def _malformed(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")  # refused: 400 and a "refused" event
    try:
        return await reader.read()
    finally:
        writer.close()


async def _admin(session: aiohttp.ClientSession, sc: SidecarProcess, path: str) -> str:
    async with asyncio.timeout(1.0), session.get(sc.admin + path) as response:  # promptly, or not at all
        assert response.status == 200
        return await response.text()


def _dropped(metrics: str, log: str) -> float:
    found = re.search(rf'^pake_log_dropped_total{{log="{log}"}} (\S+)$', metrics, re.M)
    assert found is not None, metrics
    return float(found.group(1))


async def test_access_log_to_a_stalled_stdout_neither_blocks_nor_grows(tmp_path: Path) -> None:
    bootstrap = {"service": "edge", "access_log": {"enabled": True, "path": "stdout"}}
    async with StalledStdoutSidecar(tmp_path, bootstrap=bootstrap, mesh=MESH) as sc, \
            aiohttp.ClientSession() as session:
        sc.stall()
        # ~4 KiB access lines: 800 of them are 50 times the pipe's 64 KiB and over 3 times the
        # access log's 1 MiB queue. The sidecar froze after about 15 of them before.
        target = "/" + "x" * 4000
        async with asyncio.timeout(10):
            statuses = await asyncio.gather(*(_get_many(sc.ports["outbound"], target, 100) for _ in range(8)))
        assert {s for batch in statuses for s in batch} == {404}
        assert "ok" in await _admin(session, sc, "/healthz")
        metrics = await _admin(session, sc, "/metrics")
        assert _dropped(metrics, "access") > 0
        assert _dropped(metrics, "events") == 0
        sc.resume()  # the reader is back: what was queued is written, the queue empties
        await sc.wait_for_event("access", count=100)
    assert sc.events("stopped")  # the last line, queued at drain, was written before exit
    assert sc.proc is not None and sc.proc.returncode == 0


async def test_event_lines_to_a_stalled_stdout_do_not_block(tmp_path: Path) -> None:
    bootstrap = {"service": "edge", "access_log": {"enabled": True, "path": str(tmp_path / "access.log")}}
    async with StalledStdoutSidecar(tmp_path, bootstrap=bootstrap, mesh=MESH) as sc, \
            aiohttp.ClientSession() as session:
        sc.stall()
        # Each refused request logs a ~250-byte "refused" event on stdout: 600 fill the pipe
        # twice over. The sidecar froze after about 260 of them before.
        async with asyncio.timeout(10):
            for _ in range(60):
                replies = await asyncio.gather(*(_malformed(sc.ports["outbound"]) for _ in range(10)))
                assert all(reply.startswith(b"HTTP/1.1 400 ") for reply in replies)
        assert "ok" in await _admin(session, sc, "/healthz")
        sc.resume()
        await sc.wait_for_event("refused", count=600)
