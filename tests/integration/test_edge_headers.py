"""At the gateway, outside callers cannot claim how they connected: X-Forwarded-Proto is
set from the gateway listener itself. Inside the mesh a sidecar keeps what its app says."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from tests.helpers.sidecar_process import SidecarProcess
from tests.helpers.upstreams import RecordingUpstream


async def test_the_gateway_overwrites_a_claimed_forwarded_proto(tmp_path: Path) -> None:
    async with RecordingUpstream() as app:
        mesh = {"services": {
            "gateway": {"endpoints": [], "routes": [{"match": {"path_prefix": "/echo/"}, "to": [{"service": "echo"}]}]},
            "echo": {"endpoints": [app.address], "tls": False}}}
        boot = {"service": "gateway", "mode": "gateway",
                "listeners": {"gateway": "127.0.0.1:0", "outbound": "127.0.0.1:0", "admin": "127.0.0.1:0"}}
        async with SidecarProcess(tmp_path, bootstrap=boot, mesh=mesh) as sc, aiohttp.ClientSession() as http:
            async with http.get(sc.url("gateway") + "/echo/x", headers={"X-Forwarded-Proto": "https"}) as resp:
                assert resp.status == 200
            at_edge = app.received
            async with http.get(sc.url("outbound") + "/x",
                                headers={"Host": "echo", "X-Forwarded-Proto": "https"}) as resp:
                assert resp.status == 200
            inside = app.received[len(at_edge):]
    assert b"x-forwarded-proto: http\r\n" in at_edge and b"https" not in at_edge
    assert b"x-forwarded-proto: https\r\n" in inside.lower()
