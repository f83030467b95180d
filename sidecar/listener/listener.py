"""A listener: a bound address whose accepted connections run one ``ListenerContext``.

Port 0 picks a free port; ``port`` tells which after ``start``. Past a cap a new connection
is closed at once, before a byte is read, and counted by reason: refusing early is kinder
than accepting work we cannot finish, and connections already open are not touched.

Caps (``limits``, read per accept so a reload applies to the next one):
- ``max_connections``: this listener's open connections, TLS handshakes in progress included;
- ``max_total_connections``: the same, summed over the listeners of the process;
- ``max_tls_handshakes``: handshakes in progress on this TLS listener. A handshake holds a
  socket and an OpenSSL object from accept until it completes, fails, the peer leaves or
  ``timeouts.tls_handshake`` passes; clients that connect and never send a ClientHello
  take slots only until then, and meanwhile open connections are served as usual.

TLS: a TLS listener is a plain server whose factory puts ``upstream.tls_protocol``'s
``TlsProtocol`` between the TCP transport and each ``DownstreamConnection`` (uvloop's own TLS
protocol costs more a record). It reports the handshake's end exactly once, whatever the way
(done, refused, the peer gone, ``timeouts.tls_handshake`` passed), which releases the slot;
and a refused connection is aborted before TLS starts.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable, Sequence
from typing import cast

from ..config.model import ListenerConfig
from ..upstream.tls_protocol import TlsProtocol
from .connection import DownstreamConnection, ListenerContext

__all__ = ["Listener", "ListenerGroup"]

class _Refuse(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream server's transport is a Transport (asyncio types it as the base class)
        cast(asyncio.Transport, transport).abort()


class ListenerGroup:
    """The listeners of one process, for ``max_total_connections``."""

    def __init__(self) -> None:
        self.listeners: list[Listener] = []

    def held(self) -> int:
        """Connections open or in their TLS handshake, over every listener."""
        return sum(listener.held() for listener in self.listeners)


class Listener:
    def __init__(self, config: ListenerConfig, ctx: ListenerContext, loop: asyncio.AbstractEventLoop,
                 *, ssl_context: ssl.SSLContext | None = None,
                 on_refused: Callable[[str], None] = lambda reason: None,
                 group: ListenerGroup | None = None) -> None:
        self.config = config
        self.ctx = ctx
        self.loop = loop
        self.ssl_context = ssl_context
        self.server: asyncio.Server | None = None
        self.port = config.address[1]
        self._on_refused = on_refused  # counts connections closed at once, by reason
        self.group = group if group is not None else ListenerGroup()
        self.group.listeners.append(self)
        self.handshakes = 0  # TLS handshakes in progress

    def held(self) -> int:
        return self.ctx.connections + self.handshakes

    def _refusal(self) -> str | None:
        """Which cap a new connection would pass, if any (pure; the caller counts)."""
        limits = self.ctx.limits
        if self.ctx.connections + self.handshakes >= limits.max_connections:
            return "max_connections"
        if self.group.held() >= limits.max_total_connections:
            return "max_total_connections"
        if self.ssl_context is not None and self.handshakes >= limits.max_tls_handshakes:
            return "max_tls_handshakes"
        return None

    def _protocol(self) -> asyncio.BaseProtocol:
        reason = self._refusal()
        if reason is not None:
            self._on_refused(reason)
            return _Refuse()
        conn = DownstreamConnection(self.ctx, self.loop)
        if self.ssl_context is None:
            return conn
        self.handshakes += 1
        # connection_made(conn) follows a completed handshake; a failed one closes the socket
        return TlsProtocol(self.loop, conn, self.ssl_context, server_side=True,
                           handshake_timeout=self.ctx.timeouts.tls_handshake,
                           on_handshake=self._handshake_over, down=conn)

    def _handshake_over(self, exc: BaseException | None) -> None:
        self.handshakes -= 1  # (a failed handshake is counted by tls.py, not logged here)

    async def start(self) -> None:
        host, port = self.config.address
        try:
            self.server = await self.loop.create_server(
                self._protocol, host, port, backlog=1024, reuse_address=True)
        except OSError as exc:
            raise OSError(exc.errno, f"{self.config.name} listener {host}:{port}: "
                                     f"{exc.strerror or exc}") from None
        # uvloop's Server.sockets is a list where typeshed says tuple; read untyped, since the
        # compiled form checks declared types at run time.
        sockets: Sequence[socket.socket] = getattr(self.server, "sockets")
        self.port = sockets[0].getsockname()[1]

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()
