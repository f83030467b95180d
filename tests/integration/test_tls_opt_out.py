"""A sidecar with a mesh certificate reaches other sidecars over mTLS, and a service marked
``tls: false`` (a database, an outside API: no sidecar in front) over plain HTTP."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from tests.helpers.pki import make_test_pki
from tests.helpers.sidecar_process import SidecarProcess
from tests.helpers.upstreams import RecordingUpstream


async def test_a_service_marked_tls_false_is_reached_in_plain_http(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path / "pki", services=["frontend"])
    files = pki.services["frontend"]
    async with RecordingUpstream() as plain, RecordingUpstream() as sidecar_like:
        mesh = {"services": {
            "frontend": {"endpoints": []},
            "legacy": {"endpoints": [plain.address], "tls": False},
            "orders": {"endpoints": [sidecar_like.address]},  # expects mTLS: a plain peer fails
        }}
        boot = {"service": "frontend", "listeners": {"outbound": "127.0.0.1:0", "admin": "127.0.0.1:0"},
                "tls": {"cert": str(files.cert), "key": str(files.key), "bundle": str(files.bundle)}}
        async with SidecarProcess(tmp_path, bootstrap=boot, mesh=mesh) as sc, aiohttp.ClientSession() as http:
            async with http.get(sc.url() + "/q", headers={"Host": "legacy"}) as resp:
                assert resp.status == 200
            assert plain.requests == 1 and b"GET /q HTTP/1.1" in plain.received
            async with http.get(sc.url() + "/q", headers={"Host": "orders"}) as resp:
                assert resp.status == 503  # the TLS handshake to a plain server fails: UF
            assert sidecar_like.requests == 0
