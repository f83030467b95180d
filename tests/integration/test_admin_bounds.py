"""The admin port of a real sidecar is bounded and timed like any listener (issue 8): a slow
client is cut off, connections past the cap are closed at once (and counted) while the
admin keeps answering, and a huge head is refused. What a failing route shows a client is
tested in tests/unit/admin (no sidecar route raises on purpose)."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

from sidecar.admin.server import AdminLimits
from tests.helpers.raw_client import RawClient
from tests.helpers.sidecar_process import SidecarProcess

CAP = AdminLimits().max_connections


def sidecar(tmp_path: Path) -> SidecarProcess:
    return SidecarProcess(tmp_path, bootstrap={"service": "echo",
                                               "timeouts": {"request_headers": "300ms", "idle": "1s"}},
                          mesh={"services": {"echo": {"endpoints": ["127.0.0.1:9"]}}})


async def test_a_client_that_never_finishes_its_headers_is_closed_after_the_timeout(tmp_path: Path) -> None:
    async with sidecar(tmp_path) as sc:
        slow = await RawClient.open(sc.ports["admin"])
        slow.writer.write(b"GET /healthz HTTP/1.1\r\nhost: admin\r\nx-slow: ")
        loop = asyncio.get_running_loop()
        started = loop.time()
        status, _, _ = await slow.response()
        assert status == 408
        assert await slow.closed_by_server()
        assert 0.3 <= loop.time() - started < 3.0
        # meanwhile and after, the admin answers others
        probe = await RawClient.open(sc.ports["admin"])
        assert (await probe.get("/healthz"))[0] == 200
        # and a keep-alive connection left idle is closed after the idle timeout
        assert await probe.closed_by_server(within=5.0)
        await probe.close()
        await slow.close()


async def test_connections_past_the_cap_are_closed_and_healthz_answers_once_others_close(tmp_path: Path) -> None:
    async with sidecar(tmp_path) as sc:
        port = sc.ports["admin"]
        held = [await RawClient.open(port) for _ in range(CAP)]
        for c in held:  # each answered: each is counted by the sidecar
            assert (await c.get("/healthz"))[0] == 200
        extra = [await RawClient.open(port) for _ in range(3)]
        for c in extra:
            assert await c.closed_by_server(within=2.0)
        witness, others = held[0], held[1:]
        for c in others:
            await c.close()
        # one round trip on a held connection: the sidecar has read the closes sent before it
        assert (await witness.get("/healthz"))[0] == 200
        fresh = await RawClient.open(port)
        assert (await fresh.get("/healthz"))[0] == 200
        _, _, body = await fresh.get("/metrics")
        refused = re.search(rb'^pake_downstream_connections_refused_total\{listener="admin",reason="max_connections"\} (\S+)$', body, re.M)
        assert refused is not None and float(refused.group(1)) == 3.0
        for c in (*extra, fresh, witness):
            await c.close()


async def test_a_huge_request_head_gets_431(tmp_path: Path) -> None:
    async with sidecar(tmp_path) as sc:
        c = await RawClient.open(sc.ports["admin"])
        status, _, body = await c.get("/healthz", b"x-big: " + b"a" * 40_000 + b"\r\n")
        assert status == 431 and json.loads(body)["error"] == "headers_too_large"
        assert await c.closed_by_server()
        await c.close()
