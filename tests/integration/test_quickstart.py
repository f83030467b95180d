"""The quickstart path a user runs first: the echo app behind one sidecar."""

from __future__ import annotations

from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestServer

from examples.echo import make_app
from tests.helpers.sidecar_process import SidecarProcess


async def test_outbound_routes_by_host_and_proxy_form_to_the_echo_app(tmp_path: Path) -> None:
    async with TestServer(make_app(), host="127.0.0.1", port=0) as echo:
        mesh = {"services": {"echo": {"endpoints": [f"127.0.0.1:{echo.port}"]}}}
        boot = {"service": "echo", "app": f"127.0.0.1:{echo.port}",
                "listeners": {"outbound": "127.0.0.1:0", "inbound": {"address": "127.0.0.1:0", "tls": False},
                              "admin": "127.0.0.1:0"}}
        async with SidecarProcess(tmp_path, bootstrap=boot, mesh=mesh) as sc, aiohttp.ClientSession() as http:
            # HTTP_PROXY style: absolute-form target, the authority names the service
            async with http.get("http://echo/hello?x=1", proxy=sc.url("outbound")) as resp:
                assert resp.status == 200
                body = await resp.json()
            assert body["path"] == "/hello" and body["query"] == "x=1"
            assert body["headers"]["X-Forwarded-For"] == "127.0.0.1"
            assert len(resp.headers["x-request-id"]) == 32
            # Host header style
            async with http.post(sc.url("outbound") + "/a", data=b"payload", headers={"Host": "echo"}) as resp:
                assert (await resp.json())["body"] == "payload"
            # inbound forwards to the local app
            async with http.get(sc.url("inbound") + "/in") as resp:
                assert (await resp.json())["path"] == "/in"
            # an unknown host is a local reply that says why
            async with http.get(sc.url("outbound") + "/", headers={"Host": "nope"}) as resp:
                assert resp.status == 404
                assert await resp.json() == {"error": "no_route", "detail": "no route for GET nope/",
                                             "service": "echo"}
            async with http.get(sc.admin + "/readyz") as resp:
                ready = await resp.json()
            assert ready["ready"] is True and ready["ports"]["outbound"] == sc.ports["outbound"]
        access = sc.events("access")
        assert [a["status"] for a in access] == [200, 200, 200, 404]
        assert access[-1]["flags"] == "NR"
