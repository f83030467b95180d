"""What only a fake transport can show: an admin mutation from a peer that is not loopback is
refused (the admin binds loopback, so a real socket cannot bring one), and how wait-ready
reads ``/readyz`` answers (pure)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from sidecar.admin.server import AdminResponse, AdminServer, _AdminConnection, json_response
from sidecar.wait_ready import judge


class FakeTransport(asyncio.Transport):
    def __init__(self, peer: tuple[Any, ...]) -> None:
        super().__init__()
        self.peer = peer
        self.written = b""
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def write_eof(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


@pytest.mark.parametrize(("peer", "allowed"), [
    (("127.0.0.1", 40000), True),
    (("::1", 40000, 0, 0), True),
    (("::ffff:127.0.0.1", 40000, 0, 0), True),
    (("10.1.2.3", 40000), False),
    (("::ffff:10.1.2.3", 40000, 0, 0), False),
    (("fe80::1%eth0", 40000, 0, 2), False),
])
async def test_a_mutation_is_accepted_from_loopback_peers_only(peer: tuple[Any, ...], allowed: bool) -> None:
    calls = []

    def drain() -> AdminResponse:
        calls.append("drain")
        return json_response(202, {"draining": True})

    server = AdminServer("127.0.0.1", 0, {}, post_routes={"/drain": drain})
    server.connections = 1
    conn = _AdminConnection(server, asyncio.get_running_loop())
    transport = FakeTransport(peer)
    conn.connection_made(transport)
    conn.data_received(b"POST /drain HTTP/1.1\r\nhost: admin\r\ncontent-length: 0\r\n\r\n")
    head, _, body = transport.written.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    conn.connection_lost(None)
    if allowed:
        assert (status, calls) == (202, ["drain"])
    else:
        assert (status, calls) == (403, [])
        assert json.loads(body)["detail"] == "admin changes are accepted from loopback peers only"


def readyz(**fields: Any) -> bytes:
    base = {"ready": False, "draining": False, "app_healthy": None, "config": True, "certificate": True}
    return json.dumps({**base, **fields}).encode()


@pytest.mark.parametrize(("status", "body", "ready", "detail"), [
    (200, readyz(ready=True), True, "ready"),
    # the app fails its health check because it has not started: the sidecar is ready for it
    (503, readyz(app_healthy=False), True, "ready (the local app fails its health check"),
    (503, readyz(draining=True), False, "draining"),
    (503, readyz(config=False), False, "no config yet"),
    (503, readyz(certificate=False), False, "no certificate yet"),
    (502, b"<html>bad gateway</html>", False, "/readyz answered 502 without the sidecar's JSON"),
])
def test_wait_ready_reads_the_sidecars_part_of_readyz(status: int, body: bytes, ready: bool, detail: str) -> None:
    seen = judge(status, body)
    assert seen.ready is ready and seen.detail.startswith(detail)
