"""A service's own bounds and refusals, beyond the listener's: ``max_request_body`` per
service, HTTP/1.0 with a transfer coding, a busy port named in the start-up error, and
protocol refusals counted as local replies."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

import aiohttp

from tests.helpers.sidecar_process import SidecarProcess
from tests.helpers.upstreams import RecordingUpstream


async def _exchange(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        async with asyncio.timeout(5):
            return await reader.read()
    finally:
        writer.close()


def _boot(app: str) -> dict[str, object]:
    return {"service": "orders", "app": app,
            "listeners": {"inbound": {"address": "127.0.0.1:0", "tls": False}, "admin": "127.0.0.1:0"}}


async def test_a_service_body_limit_refuses_longer_bodies_before_they_reach_the_app(tmp_path: Path) -> None:
    async with RecordingUpstream() as app:
        mesh = {"services": {"orders": {"endpoints": [], "max_request_body": "16B"}}}
        async with SidecarProcess(tmp_path, bootstrap=_boot(app.address), mesh=mesh) as sc:
            port = sc.ports["inbound"]
            ok = await _exchange(port, b"POST / HTTP/1.1\r\nHost: orders\r\nContent-Length: 16\r\n"
                                       b"Connection: close\r\n\r\n" + b"x" * 16)
            assert ok.startswith(b"HTTP/1.1 200")
            long = await _exchange(port, b"POST / HTTP/1.1\r\nHost: orders\r\nContent-Length: 17\r\n\r\n"
                                         + b"x" * 17)
            assert long.startswith(b"HTTP/1.1 413") and b'"payload_too_large"' in long
            chunked = await _exchange(port, b"POST / HTTP/1.1\r\nHost: orders\r\nTransfer-Encoding: chunked"
                                            b"\r\n\r\n10\r\n" + b"y" * 16 + b"\r\n1\r\nz\r\n0\r\n\r\n")
            assert chunked.startswith(b"HTTP/1.1 413") and b"orders's limit of 16" in chunked
            malformed = await _exchange(port, b"GET / HTTP/1.1\r\nHost: orders\r\nX_Bad: 1\r\n\r\n")
            assert malformed.startswith(b"HTTP/1.1 400")
            async with aiohttp.ClientSession() as http, http.get(sc.admin + "/metrics") as resp:
                metrics = await resp.text()
    assert app.requests == 1 and b"yyyy" not in app.received, "only the request within the limit reached the app"
    assert 'pake_local_replies_total{flag="IV",listener="inbound"} 2.0' in metrics
    assert 'pake_local_replies_total{flag="DPE",listener="inbound"} 1.0' in metrics


async def test_http_1_0_with_a_transfer_coding_is_refused(tmp_path: Path) -> None:
    async with RecordingUpstream() as app:
        mesh = {"services": {"orders": {"endpoints": []}}}
        async with SidecarProcess(tmp_path, bootstrap=_boot(app.address), mesh=mesh) as sc:
            raw = await _exchange(sc.ports["inbound"], b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"
                                                       b"1\r\nx\r\n0\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 400") and b"HTTP/1.0" in raw
    assert app.received == b""


async def test_a_busy_port_names_the_listener_in_one_line(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        sc = SidecarProcess(tmp_path, bootstrap={
            "service": "orders", "app": "127.0.0.1:1",
            "listeners": {"inbound": {"address": f"127.0.0.1:{port}", "tls": False}}},
            mesh={"services": {"orders": {"endpoints": []}}})
        sc.write_config()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sidecar", "run", "-c", str(sc.config_path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 15)
    finally:
        taken.close()
    assert proc.returncode == 1
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and f"inbound listener 127.0.0.1:{port}" in lines[0], lines
