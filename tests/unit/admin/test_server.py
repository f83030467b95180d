"""The admin server's bounds, on a real loopback socket (port 0) with routes of the test's own.

A route that raises shows what a client sees of an admin bug (a request id, never the
exception); small limits and timeouts show each bound without waiting long.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from structlog.testing import capture_logs

from sidecar.admin.server import AdminLimits, AdminResponse, AdminServer, json_response
from sidecar.config.model import DownstreamTimeouts
from tests.helpers.raw_client import RawClient as Client

SECRET = "db password is hunter2"


def ok() -> AdminResponse:
    return json_response(200, {"status": "ok"})


def broken() -> AdminResponse:
    raise RuntimeError(SECRET)


@pytest.fixture
async def admin() -> AsyncIterator[AdminServer]:
    server = AdminServer("127.0.0.1", 0, {"/healthz": ok, "/broken": broken},
                         limits=AdminLimits(max_connections=3),
                         timeouts=DownstreamTimeouts(request_headers=0.3, idle=0.5))
    await server.start()
    yield server
    server.close()


async def test_a_failing_route_answers_500_with_a_request_id_and_logs_the_exception(admin: AdminServer) -> None:
    c = await Client.open(admin.port)
    with capture_logs() as logs:
        status, headers, body = await c.get("/broken")
    assert status == 500
    reply = json.loads(body)
    assert reply["detail"] == "internal error" and SECRET not in body.decode()
    assert "RuntimeError" not in body.decode()
    assert headers["x-request-id"] == reply["request_id"] and len(reply["request_id"]) == 32
    failed = [e for e in logs if e["event"] == "admin_route_failed"]
    assert len(failed) == 1 and failed[0]["request_id"] == reply["request_id"]
    assert failed[0]["exc_info"] is True and failed[0]["path"] == "/broken"
    # the connection and the server carry on
    assert (await c.get("/healthz"))[0] == 200
    await c.close()


async def test_a_500_keeps_the_callers_request_id(admin: AdminServer) -> None:
    c = await Client.open(admin.port)
    status, headers, body = await c.get("/broken", b"x-request-id: probe-7\r\n")
    assert status == 500 and json.loads(body)["request_id"] == "probe-7" == headers["x-request-id"]
    await c.close()


async def test_a_request_head_that_never_ends_is_answered_408_and_closed(admin: AdminServer) -> None:
    c = await Client.open(admin.port)
    c.writer.write(b"GET /healthz HTTP/1.1\r\nhost: admin\r\n")
    loop = asyncio.get_running_loop()
    started = loop.time()
    for _ in range(3):  # trickling more header lines does not extend the deadline
        await asyncio.sleep(0.1)
        c.writer.write(b"x-slow: 1\r\n")
    status, _, body = await c.response()
    assert status == 408 and json.loads(body)["error"] == "request_timeout"
    assert await c.closed_by_server()
    assert 0.3 <= loop.time() - started < 2.0
    await c.close()


async def test_an_idle_keep_alive_connection_is_closed(admin: AdminServer) -> None:
    c = await Client.open(admin.port)
    assert (await c.get("/healthz"))[0] == 200
    started = asyncio.get_running_loop().time()
    assert await c.closed_by_server()
    assert asyncio.get_running_loop().time() - started >= 0.4
    await c.close()


async def test_a_connection_that_sends_nothing_is_closed_after_the_idle_timeout(admin: AdminServer) -> None:
    c = await Client.open(admin.port)
    assert await c.closed_by_server()
    await c.close()


async def test_connections_past_the_cap_are_closed_at_once_and_counted(admin: AdminServer) -> None:
    held = [await Client.open(admin.port) for _ in range(3)]
    for c in held:  # each is counted once the server answered on it
        assert (await c.get("/healthz"))[0] == 200
    with capture_logs() as logs:
        extra = await Client.open(admin.port)
        assert await extra.closed_by_server(within=1.0)
    assert admin.refused == 1 and [e["event"] for e in logs] == ["admin_connection_refused"]
    await extra.close()
    for c in held[1:]:
        await c.close()
    assert (await held[0].get("/healthz"))[0] == 200  # the server has seen the two closes
    fresh = await Client.open(admin.port)
    assert (await fresh.get("/healthz"))[0] == 200
    assert admin.connections == 2
    await fresh.close()
    await held[0].close()


async def test_a_huge_request_head_is_refused_with_431(admin: AdminServer) -> None:
    c = await Client.open(admin.port)
    status, _, body = await c.get("/healthz", b"x-big: " + b"a" * 40_000 + b"\r\n")
    assert status == 431 and json.loads(body)["error"] == "headers_too_large"
    assert await c.closed_by_server()
    await c.close()


async def test_a_request_body_past_the_small_bound_is_refused_with_413(admin: AdminServer) -> None:
    c = await Client.open(admin.port)
    c.writer.write(b"GET /healthz HTTP/1.1\r\nhost: admin\r\ncontent-length: 2048\r\n\r\n" + b"x" * 2048)
    status, _, _ = await c.response()
    assert status == 413
    assert await c.closed_by_server()
    await c.close()


async def test_a_client_that_pipelines_and_never_reads_is_cut_off(admin: AdminServer) -> None:
    big = b"y" * 64 * 1024
    admin.routes["/big"] = lambda: (200, b"text/plain", big)
    c = await Client.open(admin.port)
    request = b"GET /big HTTP/1.1\r\nhost: admin\r\n\r\n"
    try:
        for _ in range(40):  # 64 MiB of answers if each were buffered
            c.writer.write(request * 25)
            await asyncio.wait_for(c.writer.drain(), 5)
    except ConnectionResetError:
        pass
    assert await c.closed_by_server()
    await c.close()
