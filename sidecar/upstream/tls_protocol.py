"""TLS between uvloop's plain TCP transport and a connection's protocol, over memory BIOs:
the TLS layer of the pool's connections and of the TLS listeners.

uvloop's own TLS protocol does the same with more around each record: its own buffer and
backlog, two calls into the protocol a read (``get_buffer``, ``buffer_updated``), two
``SSL_pending`` calls a read (each releases the GIL). A TLS echo round trip cost a uvloop
server 32.4k instructions on its TLS layer and 26.5k on a prototype of this one, interpreted
(callgrind; bench/README.md). OpenSSL reading the socket itself was cheaper still in
instructions but not in time: without read-ahead it reads a record's header and its body
in two syscalls, where the TCP transport reads a whole burst into the incoming BIO in one.

``TlsProtocol`` is the TCP transport's protocol and its connection's transport: the
asyncio ``Transport`` that ``UpstreamConnection`` and ``DownstreamConnection`` speak
(``write``, flow control both ways, ``close`` after what is written with a close_notify,
``abort``, ``get_extra_info("ssl_object")`` for the peer's certificate and session). The
handshake's end, whatever the way, is reported once to ``on_handshake``: the pool awaits
it, a listener releases its handshake slot. Handshakes are counted by the context's
``sslobject_class`` (``tls.py``), and a ``ResumingContext`` offers its session in
``wrap_bio``, as with uvloop.

Not done: a half-close (the peer's EOF or close_notify closes), and waiting for the peer's
close_notify after sending ours (HTTP/1.1 frames its messages).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any, Final, Protocol, cast

__all__ = ["ConnectionApp", "TlsProtocol"]

_EOF: Final = (ssl.SSLZeroReturnError, ssl.SSLEOFError)


class ConnectionApp(Protocol):
    """The connection a ``TlsProtocol`` carries: an asyncio protocol (``UpstreamConnection``,
    ``DownstreamConnection``) that also reads into a buffer of its own, where records are
    decrypted. The connections are ``asyncio.Protocol``s, not ``BufferedProtocol``s: on a
    plain connection uvloop then hands over each read as bytes, one callback and no view (see
    ``DownstreamConnection``)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None: ...

    def connection_lost(self, exc: Exception | None) -> None: ...

    def eof_received(self) -> bool | None: ...

    def pause_writing(self) -> None: ...

    def resume_writing(self) -> None: ...

    def get_buffer(self, sizehint: int) -> bytearray: ...

    def buffer_updated(self, nbytes: int) -> None: ...


class TlsProtocol(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop, app: ConnectionApp,
                 context: ssl.SSLContext, *, server_side: bool, server_hostname: str | None = None,
                 handshake_timeout: float, on_handshake: Callable[[BaseException | None], None]) -> None:
        self._loop = loop
        self._app = app
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = ssl_object = context.wrap_bio(self._incoming, self._outgoing,
                                                  server_side=server_side,
                                                  server_hostname=server_hostname)
        # the C object's own methods (ssl.SSLObject's are Python wrappers around them)
        native: Any = getattr(ssl_object, "_sslobj")
        self._read: Callable[[int, bytearray], int] = native.read
        self._write: Callable[[bytes | bytearray | memoryview], int] = native.write
        self._pending: Callable[[], int] = native.pending
        self._incoming_write = self._incoming.write
        self._outgoing_read = self._outgoing.read
        self._app_get_buffer = app.get_buffer
        self._app_buffer_updated = app.buffer_updated
        self._handshake_timeout = handshake_timeout
        self._on_handshake: Callable[[BaseException | None], None] | None = on_handshake
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None
        self._send: Callable[[bytes], object] | None = None
        self._handshaking = True
        self._connected = False  # the app was given the connection
        self._app_reading = True  # the app has not paused reading
        self._closing = False
        self._error: Exception | None = None  # what broke the session, for connection_lost

    # === below: the TCP transport's protocol =============================================
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tcp = self._transport = cast(asyncio.Transport, transport)
        self._send = tcp.write
        self._timer = self._loop.call_later(self._handshake_timeout, self._handshake_too_slow)
        self._handshake_step()  # a client's ClientHello; a server waits for one

    def data_received(self, data: bytes) -> None:
        # what the TCP transport read, as bytes: a plain Protocol, not a BufferedProtocol,
        # since the incoming BIO copies it anyway (a buffer asked for and a view sliced each
        # read cost more than the bytes object, ~1k instructions, callgrind)
        self._incoming_write(data)
        if self._handshaking:
            self._handshake_step()
        elif self._app_reading:
            self._read_records()

    def eof_received(self) -> bool | None:
        if self._handshaking:
            self._handshake_over(ConnectionResetError("the peer closed during the TLS handshake"))
            return False
        if self._connected and not self._closing:
            self._closing = True
            self._app.eof_received()
        return False  # the TCP transport closes; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self._handshaking:
            self._handshake_over(exc or ConnectionResetError("the connection closed during the TLS handshake"))
        if self._connected:
            self._connected = False
            # a broken session is why, not the abort that followed it
            self._app.connection_lost(exc or self._error)
        self._transport = self._send = None

    def pause_writing(self) -> None:
        if self._connected:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._connected:
            self._app.resume_writing()

    # === the handshake ====================================================================
    def _handshake_step(self) -> None:
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, OSError) as exc:  # refused: the alert goes out, then the connection
            self._flush()
            self._handshake_over(exc)
            return
        self._flush()
        self._handshake_over(None)

    def _handshake_too_slow(self) -> None:
        self._timer = None
        if self._handshaking:
            self._handshake_over(TimeoutError(f"TLS handshake not done in {self._handshake_timeout}s"))

    def _handshake_over(self, exc: BaseException | None) -> None:
        if not self._handshaking:
            return
        self._handshaking = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        report = self._on_handshake
        self._on_handshake = None
        if exc is not None:
            self._closing = True
            if self._transport is not None:
                self._transport.close()  # after the alert, if any
            if report is not None:
                report(exc)
            return
        if report is not None:
            report(None)
        if self._closing:
            return
        self._connected = True
        self._app.connection_made(cast(asyncio.Transport, self))
        if self._incoming.pending and self._app_reading and not self._closing:
            self._read_records()  # the peer's first bytes came with its last handshake message

    # === reading ==========================================================================
    def _read_records(self) -> None:
        incoming = self._incoming
        while self._app_reading and not self._closing:
            buffer = self._app_get_buffer(-1)
            try:
                n = self._read(len(buffer), buffer)
            except ssl.SSLWantReadError:
                break  # part of a record, or no data in it (a session ticket)
            except _EOF:
                n = 0
            except (ssl.SSLError, OSError) as exc:
                self._fatal(exc)
                return
            if n == 0:  # the peer's close_notify
                self._flush()
                self._closing = True
                self._app.eof_received()
                if self._transport is not None:
                    self._transport.close()
                return
            self._app_buffer_updated(n)
            # a whole record was read unless it filled the buffer: go on while bytes wait
            if not incoming.pending and (n < len(buffer) or not self._pending()):
                break
        if self._outgoing.pending:  # what reading made OpenSSL answer (a key update)
            self._flush()

    def pause_reading(self) -> None:
        if self._app_reading:
            self._app_reading = False
            if self._transport is not None and not self._closing:
                self._transport.pause_reading()

    def resume_reading(self) -> None:
        if not self._app_reading:
            self._app_reading = True
            if self._transport is not None and not self._closing:
                self._transport.resume_reading()
                if self._incoming.pending or self._pending():  # held while paused
                    self._loop.call_soon(self._resume_held)

    def _resume_held(self) -> None:
        if self._connected and self._app_reading and not self._closing:
            self._read_records()

    def is_reading(self) -> bool:
        return self._app_reading

    # === writing ==========================================================================
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not self._connected:
            return  # after close or abort: nothing more goes out
        try:
            self._write(data)
        except (ssl.SSLError, OSError) as exc:
            self._fatal(exc)
            return
        self._flush()

    def _flush(self) -> None:
        send = self._send
        if send is not None:
            data = self._outgoing_read()
            if data:
                send(data)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() if self._transport is not None else 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._transport is not None:
            self._transport.set_write_buffer_limits(high, low)

    def can_write_eof(self) -> bool:
        return False  # no half-close (see the module docstring)

    # === closing ==========================================================================
    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Our close_notify after what is written, then the TCP transport's close."""
        if self._closing:
            return
        self._closing = True
        try:
            self._ssl.unwrap()
        except (ssl.SSLError, OSError, ValueError):
            pass  # the peer's close_notify is not awaited (non-blocking BIOs)
        self._flush()
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.abort()

    def _fatal(self, exc: Exception) -> None:
        self._closing = True
        self._error = exc
        if self._transport is not None:
            self._transport.abort()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._ssl
        if name == "sslcontext":
            return self._ssl.context
        if name == "peercert":
            return self._ssl.getpeercert()
        if name == "cipher":
            return self._ssl.cipher()
        if self._transport is not None:
            return self._transport.get_extra_info(name, default)
        return default
