"""Upstream servers for tests, on 127.0.0.1 port 0.

``RecordingUpstream`` is a raw asyncio server that records every byte it receives and
answers each request it can parse with a fixed 200, so a test can assert both what was
forwarded (re-serialised, never raw) and that a refused request reached nobody.
"""

from __future__ import annotations

import asyncio
from ssl import SSLContext

import httptools

__all__ = ["RecordingUpstream"]


class _Conn(asyncio.Protocol):
    def __init__(self, owner: RecordingUpstream) -> None:
        self.owner = owner
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.owner.connections += 1

    def data_received(self, data: bytes) -> None:
        self.owner.received += data
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_message_complete(self) -> None:
        self.owner.requests += 1
        assert self.transport is not None
        self.transport.write(self.owner.response)


class RecordingUpstream:
    def __init__(self, response: bytes = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", *,
                 ssl: SSLContext | None = None) -> None:
        self.response = response
        self.ssl = ssl  # a server context: what a mesh peer's inbound receives, decrypted
        self.received = b""
        self.requests = 0
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def __aenter__(self) -> RecordingUpstream:
        loop = asyncio.get_running_loop()
        # The backlog is a production server's, not asyncio's 100: this upstream shares its loop
        # with the test's own clients, and a test that opens hundreds of TLS connections at once
        # can keep it from accepting for a while. With a full accept queue the kernel drops the
        # sidecar's SYN, and its retransmission (1 s) comes after the 1 s connect timeout.
        self.server = await loop.create_server(lambda: _Conn(self), "127.0.0.1", 0, backlog=4096, ssl=self.ssl)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
