"""A listener: a bound address whose accepted connections run one ``ListenerContext``.

Port 0 picks a free port; ``port`` tells which after ``start``. Past ``max_connections``
a new connection is closed at once (and counted): refusing early is kinder than
accepting work we cannot finish.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import cast

from ..config.model import ListenerConfig
from .connection import DownstreamConnection, ListenerContext

__all__ = ["Listener"]


class _Refuse(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream server's transport is a Transport (asyncio types it as the base class)
        cast(asyncio.Transport, transport).abort()


class Listener:
    def __init__(self, config: ListenerConfig, ctx: ListenerContext, loop: asyncio.AbstractEventLoop,
                 *, ssl_context: ssl.SSLContext | None = None,
                 on_refused: Callable[[], None] = lambda: None) -> None:
        self.config = config
        self.ctx = ctx
        self.loop = loop
        self.ssl_context = ssl_context
        self.server: asyncio.Server | None = None
        self.port = config.address[1]
        self._on_refused = on_refused  # counts connections closed at once (max_connections)

    def _protocol(self) -> asyncio.BaseProtocol:
        if self.ctx.connections >= self.ctx.limits.max_connections:
            self._on_refused()
            return _Refuse()
        return DownstreamConnection(self.ctx, self.loop)

    async def start(self) -> None:
        host, port = self.config.address
        # TLS (inbound mTLS, or the gateway's server-only TLS): the loop runs the handshake;
        # connection_made (and the peer identity check, mTLS only) follows a completed one.
        # A fixed context: see certs' server_dispatcher and sidecar.tls.ServerTls for rotation.
        # a client that stops mid-handshake holds a socket and an SSL object until this passes
        handshake_timeout = self.ctx.timeouts.tls_handshake if self.ssl_context is not None else None
        try:
            self.server = await self.loop.create_server(
                self._protocol, host, port, backlog=1024, reuse_address=True, ssl=self.ssl_context,
                ssl_handshake_timeout=handshake_timeout)
        except OSError as exc:
            raise OSError(exc.errno, f"{self.config.name} listener {host}:{port}: "
                                     f"{exc.strerror or exc}") from None
        self.port = self.server.sockets[0].getsockname()[1]

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()
