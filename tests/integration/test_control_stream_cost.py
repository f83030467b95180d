"""What one stream costs the control plane: no per-message compression on /v1/stream.

permessage-deflate (offered by default by ``websockets``, the sidecar's client) would keep
~290 KB of zlib state per stream (a 1,000-sidecar control plane measured 360 MB instead of
135 MB, bench/fanout.py) and compress every snapshot once per sidecar on each push, in a
worker thread past 16 KiB. Snapshots are sent once per sidecar per change, so compression
costs the control plane far more than it saves on loopback or a data-centre network.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from control.server import ControlPlane, ServeOptions
from tests.helpers.mesh_client import MeshClient


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[ControlPlane]:
    p = await ControlPlane.open(ServeOptions(state_dir=tmp_path / "state", listen=("127.0.0.1", 0),
                                             admin=("127.0.0.1", 0)))
    await p.start()
    yield p
    await p.stop()


async def test_stream_declines_per_message_compression(plane: ControlPlane, tmp_path: Path) -> None:
    admin = f"http://127.0.0.1:{plane.ports['admin']}"
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{admin}/v1/config",
                             json={"mesh": {"services": {"orders": {}}}, "by": "test"}) as r:
            assert r.status == 200, await r.text()
        async with http.post(f"{admin}/v1/tokens", json={"service": "orders"}) as r:
            token = (await r.json())["token"]
    client = MeshClient(tmp_path, f"127.0.0.1:{plane.ports['listen']}", service="orders")
    await client.join(token)
    await client.connect()  # websockets offers permessage-deflate
    try:
        snapshot = await client.wait_snapshot()
        assert client.ws is not None
        assert client.ws.protocol.extensions == []
        assert client.ws.response is not None
        assert "permessage-deflate" not in (client.ws.response.headers.get("Sec-WebSocket-Extensions") or "")
        assert snapshot.mesh["services"]["orders"] is not None
    finally:
        await client.close()
