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

TLS: OpenSSL reads and writes the socket itself (``upstream.tls_transport``: uvloop's TLS
layer costs an exchange ~8k instructions more). A TLS listener is a plain server whose
factory returns ``_TlsAccept`` for each connection: it takes the socket from the loop (a
duplicate of its descriptor; the loop's handle is aborted before it reads a byte), runs the
handshake, and starts the ``DownstreamConnection`` on a ``TlsTransport`` when it completes.
The handshake's end, whatever the way (done, failed, the peer gone, ``tls_handshake``
passed), releases the slot once; a refused connection is aborted before TLS starts.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import Callable, Sequence
from typing import cast

from ..config.model import ListenerConfig
from ..upstream.tls_transport import Handshake, TlsTransport
from .connection import DownstreamConnection, ListenerContext

__all__ = ["Listener", "ListenerGroup"]

class _Refuse(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream server's transport is a Transport (asyncio types it as the base class)
        cast(asyncio.Transport, transport).abort()


class _TlsAccept(asyncio.Protocol):
    """One accepted TLS connection until its handshake ends (see the module docstring)."""

    def __init__(self, listener: Listener, context: ssl.SSLContext, conn: DownstreamConnection) -> None:
        self.listener = listener
        self.context = context
        self.conn = conn
        self.tls: ssl.SSLSocket | None = None
        self.handshake: Handshake | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        listener = self.listener
        try:
            fd = os.dup(transport.get_extra_info("socket").fileno())
        except OSError:  # out of descriptors: as if refused
            cast(asyncio.Transport, transport).abort()
            listener.handshake_over()
            return
        cast(asyncio.Transport, transport).abort()  # the loop lets go; the connection lives on in fd
        sock = socket.socket(fileno=fd)
        try:
            sock.setblocking(False)
            self.tls = tls = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except OSError:
            sock.close()
            listener.handshake_over()
            return
        loop = listener.loop
        self.handshake = handshake = Handshake(loop, tls)
        if handshake.done.done():
            self._over(handshake.done)
            return
        self.timer = loop.call_later(listener.ctx.timeouts.tls_handshake, handshake.cancel)
        handshake.done.add_done_callback(self._over)

    def _over(self, done: asyncio.Future[None]) -> None:
        self.listener.handshake_over()
        if self.timer is not None:
            self.timer.cancel()
        tls = self.tls
        assert tls is not None and self.handshake is not None
        if done.cancelled() or done.exception() is not None:
            # refused (counted by tls.py), the peer gone, or too slow: nothing was read yet
            self.handshake.disarm()
            tls.close()
            return
        TlsTransport(self.listener.loop, tls, self.conn).start()

    def connection_lost(self, exc: Exception | None) -> None:
        pass  # the loop's handle, aborted in connection_made: the connection goes on in ours


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
        return _TlsAccept(self, self.ssl_context, conn)

    def handshake_over(self) -> None:
        self.handshakes -= 1

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
