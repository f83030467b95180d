"""TLS between uvloop's plain TCP transport and a connection's protocol, over memory BIOs:
the TLS layer of the pool's connections and of the TLS listeners.

uvloop's own TLS protocol does the same with more around each record: its own buffer and
backlog, two calls into the protocol a read (``get_buffer``, ``buffer_updated``), two
``SSL_pending`` calls a read (each releases the GIL). A TLS echo round trip cost a uvloop
server 32.4k instructions on its TLS layer and 26.5k on a prototype of this one, interpreted
(callgrind; bench/README.md). OpenSSL reading the socket itself was cheaper still in
instructions but not in time: without read-ahead it reads a record's header and its body
in two syscalls, where the TCP transport reads a whole burst into the incoming BIO in one.
The compiled form reads and writes the records through the wire's C helpers (``TLS_READ``,
``TLS_WRITE``: OpenSSL's calls made with the GIL held, which ``_ssl`` gives up and takes back
around each one).

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
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

from ..http.wire import TLS_READ, TLS_WRITE

if TYPE_CHECKING:
    from ..listener.connection import DownstreamConnection
    from .upstream_connection import UpstreamConnection

__all__ = ["ConnectionApp", "TLS_RECORD", "TlsProtocol"]

_EOF: Final = (ssl.SSLZeroReturnError, ssl.SSLEOFError)
# Final: compiled, C statics (an imported name is a look-up in the module's globals a read)
_TLS_READ: Final = TLS_READ
_TLS_WRITE: Final = TLS_WRITE
# The most plaintext one TLS record carries (RFC 8446 §5.1), and so the most one read of
# OpenSSL's returns: a read is a new bytes object of the size asked for, cut to what it holds.
TLS_RECORD: Final = 16384


class ConnectionApp(Protocol):
    """The connection a ``TlsProtocol`` carries: an ``asyncio.Protocol``
    (``UpstreamConnection``, ``DownstreamConnection``) given each record's plaintext as
    bytes, as uvloop gives it a plain connection's reads. Decrypted into a buffer of the
    connection's own instead (``get_buffer``, ``buffer_updated``), a record cost two calls by
    name and a view sliced for the parser: ~1.1k instructions more than the bytes object
    (callgrind), and a 256 KiB buffer a TLS listener and 64 KiB a cluster manager."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None: ...

    def connection_lost(self, exc: Exception | None) -> None: ...

    def eof_received(self) -> bool | None: ...

    def pause_writing(self) -> None: ...

    def resume_writing(self) -> None: ...

    def data_received(self, data: bytes) -> None: ...


class TlsProtocol(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop, app: ConnectionApp,
                 context: ssl.SSLContext, *, server_side: bool, server_hostname: str | None = None,
                 handshake_timeout: float, on_handshake: Callable[[BaseException | None], None],
                 up: UpstreamConnection | None = None, down: DownstreamConnection | None = None) -> None:
        self._loop = loop
        self._app = app
        # ``up`` / ``down``: the app, when it is a pool's or a listener's connection. Compiled,
        # its ``data_received`` is then a native call, where the bound method went through
        # its wrapper (~110 instructions a record, callgrind); the tests' apps are neither.
        self._up = up
        self._down = down
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = ssl_object = context.wrap_bio(self._incoming, self._outgoing,
                                                  server_side=server_side,
                                                  server_hostname=server_hostname)
        # the C object's own methods (ssl.SSLObject's are Python wrappers around them); its
        # reads and writes through the wire's C helpers where the compiled form has them
        native: Any = getattr(ssl_object, "_sslobj")
        self._native: object = native
        # (not with a message callback, a debugging hook: an exception it raises fails the
        # method's read or write that ran it, and the helpers would leave it for the next call)
        self._records = _TLS_READ is not None and getattr(context, "_msg_callback", None) is None
        self._read: Callable[[int], bytes] = native.read
        self._write: Callable[[bytes | bytearray | memoryview], int] = native.write
        self._pending: Callable[[], int] = native.pending
        self._incoming_write = self._incoming.write
        self._outgoing_read = self._outgoing.read
        self._app_data_received = app.data_received
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
        # the last read took every byte the incoming BIO held, and no record was left half
        # read: what arrives next is all that waits (``_read_records``)
        self._drained = False

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
            if self._drained:
                # the read starts at a record: one record, whole, when its header's length
                # (bytes 3-4) is what arrived
                n = len(data)
                self._read_records(n, n > 5 and (data[3] << 8 | data[4]) + 5 == n)
            else:
                self._read_records(TLS_RECORD, False)

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
    def _read_records(self, size: int = TLS_RECORD, one_record: bool = False) -> None:
        """Hand each record's plaintext to the app while whole records wait. ``size``: what
        the first read asks for. A record's plaintext is shorter than its ciphertext, so
        when the ciphertext waiting is known (all of it arrived in this read, ``_drained``)
        the read asks for that much: a small record's bytes object then comes from Python's
        small-object allocator and is cut in place, where 16 KiB asked for and cut to a few
        hundred bytes cost ~700 instructions of malloc and realloc (callgrind).
        ``one_record``: what waits is one whole record, so its plaintext is all there is:
        no asking the incoming BIO what is left (a property read by name, ~285 instructions).
        """
        self._drained = False
        incoming = self._incoming
        while self._app_reading and not self._closing:
            if size > TLS_RECORD:
                size = TLS_RECORD
            try:
                data = _TLS_READ(self._native, size) if self._records and _TLS_READ is not None else self._read(size)
            except ssl.SSLWantReadError:
                break  # part of a record, or no data in it (a session ticket)
            except _EOF:
                data = b""
            except (ssl.SSLError, OSError) as exc:
                self._fatal(exc)
                return
            if len(data) == 0:  # the peer's close_notify (``len``: a bytes object's truth is a generic call)
                self._flush()
                self._closing = True
                self._app.eof_received()
                if self._transport is not None:
                    self._transport.close()
                return
            self._deliver(data)
            if one_record:
                self._drained = True
                break
            # a whole record was read unless it filled the read: go on while bytes wait
            waiting = incoming.pending
            if waiting:
                size = waiting
            elif len(data) < size or not self._pending():
                self._drained = True
                break
            else:
                size = TLS_RECORD  # the rest of a record read in part
        if self._outgoing.pending:  # what reading made OpenSSL answer (a key update)
            self._flush()

    def _deliver(self, data: bytes) -> None:
        up = self._up
        if up is not None:
            up.data_received(data)
            return
        down = self._down
        if down is not None:
            down.data_received(data)
        else:
            self._app_data_received(data)

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
            if self._records and _TLS_WRITE is not None:
                _TLS_WRITE(self._native, data)
            else:
                self._write(data)
        except (ssl.SSLError, OSError) as exc:
            self._fatal(exc)
            return
        self._flush()

    def _flush(self) -> None:
        send = self._send
        if send is not None:
            data = self._outgoing_read()
            if len(data):
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
