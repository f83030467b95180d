"""TLS on a socket that OpenSSL reads and writes itself: the pool's connections to
upstreams, and the connections a TLS listener accepts.

uvloop's TLS layer passes every record through two memory BIOs, its own write backlog and
two calls into the protocol (``get_buffer``, ``buffer_updated``), and asks OpenSSL what it
holds twice a read: a TLS echo round trip costs a uvloop server 32.3k instructions, and
21.9k with an ``SSLSocket`` on the socket whose C ``read`` decrypts straight into the
protocol's buffer and whose ``write`` encrypts straight onto the socket (callgrind, a
100-byte message, ``bench/tls_echo.py``). On the mTLS pair that is one read and one write
of each exchange on each side of each sidecar.

``open_tls`` connects, runs the ``Handshake`` on the loop's readiness callbacks and hands
the protocol a ``TlsTransport``: the asyncio ``Transport`` that ``UpstreamConnection`` and
``DownstreamConnection`` already speak (``write``, flow control both ways, ``close`` after
what is written, ``abort``, and ``get_extra_info("ssl_object")`` for the peer's certificate
and session). A TLS listener takes each accepted socket from the loop and does the same
(``listener.listener``).

What it does not do: a half-close (EOF from the peer closes, as on uvloop's TLS), and waiting for
the peer's close_notify after sending ours (HTTP/1.1 frames its messages, RFC 9112 §9.8).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from typing import Any, Final, cast

__all__ = ["Handshake", "TlsTransport", "open_tls"]

_AGAIN: Final = (ssl.SSLWantReadError, ssl.SSLWantWriteError)
# EOF from the peer: a close_notify (SSL_read gives 0, or ZeroReturn once shut down), or
# the socket's end without one (OpenSSL 3 reports that as an EOF in violation of protocol)
_EOF: Final = (ssl.SSLZeroReturnError, ssl.SSLEOFError)


class TlsTransport:
    """One TLS connection after its handshake. Writes that the socket cannot take now wait
    in a backlog, in order (an ``SSL_write`` that stopped half-way is retried with the same
    bytes, as OpenSSL requires); the protocol is told to pause above the high-water mark.

    What ``asyncio.Transport`` offers, without deriving from it: compiled, a class derived
    from one with ``__slots__`` (``BaseTransport``'s ``_extra``) crashed at its first use."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: ssl.SSLSocket,
                 protocol: asyncio.BufferedProtocol) -> None:
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        # the C object's own methods: ssl.SSLSocket's are Python wrappers around them
        native: Any = getattr(sock, "_sslobj")
        self._read: Callable[[int, bytearray], int] = native.read
        self._write: Callable[[bytes | bytearray | memoryview], int] = native.write
        self._pending: Callable[[], int] = native.pending
        self._protocol = protocol
        # (typed as what the pool's and the listener's protocols return: their read buffer)
        self._get_buffer = cast(Callable[[int], bytearray], protocol.get_buffer)
        self._buffer_updated = protocol.buffer_updated
        self._backlog: list[bytes] = []
        self._backlog_size = 0
        self._high = 64 * 1024
        self._low = 16 * 1024
        self._protocol_paused = False  # told the protocol to pause writing
        self._reading = False
        self._writing = False  # waiting for the socket to be writable
        self._closing = False
        self._closed = False
        self._peername: Any = None
        self._sockname: Any = None
        try:
            self._peername = sock.getpeername()
            self._sockname = sock.getsockname()
        except OSError:
            pass

    def start(self) -> None:
        """Hand the connection to its protocol and start reading."""
        self._protocol.connection_made(cast(asyncio.Transport, self))
        if not self._closing:
            self.resume_reading()

    # --- reading --------------------------------------------------------------------------
    def _on_readable(self) -> None:
        buffer = self._get_buffer(-1)
        try:
            n = self._read(len(buffer), buffer)
        except ssl.SSLWantReadError:
            return  # a part of a record, or a record that was no data (a session ticket)
        except ssl.SSLWantWriteError:
            self._read_when_writable()  # OpenSSL has to send first (a key update's answer)
            return
        except _EOF:
            n = 0
        except OSError as exc:
            self._fatal(exc)
            return
        if n == 0:
            self._on_eof()
            return
        self._buffer_updated(n)
        # one record at most per read: a record larger than the buffer left the rest in
        # OpenSSL, where the socket's readiness will not announce it
        if n == len(buffer) and self._reading and self._pending():
            self._loop.call_soon(self._on_readable)

    def _read_when_writable(self) -> None:
        def retry() -> None:
            self._loop.remove_writer(self._fd)
            self._writing = False
            if self._backlog:
                self._on_writable()
            if self._reading:
                self._on_readable()
        if not self._writing:
            self._writing = True
            self._loop.add_writer(self._fd, retry)

    def _on_eof(self) -> None:
        self.pause_reading()
        keep_open = self._protocol.eof_received()
        if not keep_open:
            self.close()

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if not self._reading and not self._closing:
            self._reading = True
            self._loop.add_reader(self._fd, self._on_readable)
            if self._pending():  # decrypted while reading was paused: no readiness will say so
                self._loop.call_soon(self._on_readable)

    def is_reading(self) -> bool:
        return self._reading

    # --- writing --------------------------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing:
            return  # after close or abort: nothing more goes out (as uvloop's transports)
        if not self._backlog:
            try:
                self._write(data)
                return
            except _AGAIN:
                pass
            except OSError as exc:
                self._fatal(exc)
                return
        chunk = bytes(data)
        self._backlog.append(chunk)
        self._backlog_size += len(chunk)
        if not self._writing:
            self._writing = True
            self._loop.add_writer(self._fd, self._on_writable)
        if not self._protocol_paused and self._backlog_size > self._high:
            self._protocol_paused = True
            self._protocol.pause_writing()

    def _on_writable(self) -> None:
        backlog = self._backlog
        while backlog:
            chunk = backlog[0]
            try:
                self._write(chunk)
            except _AGAIN:
                return
            except OSError as exc:
                self._fatal(exc)
                return
            backlog.pop(0)
            self._backlog_size -= len(chunk)
        self._writing = False
        self._loop.remove_writer(self._fd)
        if self._protocol_paused and self._backlog_size <= self._low:
            self._protocol_paused = False
            self._protocol.resume_writing()
        if self._closing:
            self._finish(None, notify=True)

    def get_write_buffer_size(self) -> int:
        return self._backlog_size

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = 64 * 1024 if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low

    def can_write_eof(self) -> bool:
        return False  # TLS has no half-close (and no write_eof here)

    # --- closing --------------------------------------------------------------------------
    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Close after what is written: our close_notify, then the socket."""
        if self._closing:
            return
        self._closing = True
        self.pause_reading()
        if not self._backlog:
            self._finish(None, notify=True)

    def abort(self) -> None:
        self._closing = True
        self._finish(None, notify=False)

    def _fatal(self, exc: OSError) -> None:
        self._closing = True
        self._finish(exc, notify=False)

    def _finish(self, exc: Exception | None, *, notify: bool) -> None:
        if self._closed:
            return
        self._closed = True
        self._reading = False
        self._loop.remove_reader(self._fd)
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)
        self._backlog.clear()
        self._backlog_size = 0
        if notify:
            try:
                getattr(self._sock, "_sslobj").shutdown()  # sends our close_notify
            except (OSError, ValueError):
                pass  # the peer's has not come (non-blocking), or the socket is gone
        self._sock.close()
        self._loop.call_soon(self._protocol.connection_lost, exc)

    # --- what the protocol may ask --------------------------------------------------------
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        sock = self._sock
        if name == "ssl_object" or name == "socket":
            return sock
        if name == "sslcontext":
            return sock.context
        if name == "peername":
            return self._peername
        if name == "sockname":
            return self._sockname
        if name == "peercert":
            return None if self._closed else sock.getpeercert()
        if name == "cipher":
            return None if self._closed else sock.cipher()
        if name == "compression":
            return None if self._closed else sock.compression()
        return default


async def open_tls(loop: asyncio.AbstractEventLoop, protocol: asyncio.BufferedProtocol, host: str,
                   port: int, context: ssl.SSLContext, server_hostname: str | None) -> TlsTransport:
    """Connect to ``host:port``, complete the TLS handshake and start ``protocol`` on the
    connection; raises what ``loop.create_connection(ssl=...)`` would (``OSError``,
    ``ssl.SSLError``). The caller bounds the time (the pool's connect timeout). ``context``
    may also be a ``certs.session_cache.ResumingContext``, which offers a session."""
    sock = await _connect(loop, host, port)
    tls = context.wrap_socket(sock, server_side=False, do_handshake_on_connect=False,
                              server_hostname=server_hostname)
    handshake = Handshake(loop, tls)
    try:
        await handshake.done
    except BaseException:
        handshake.disarm()
        tls.close()
        raise
    transport = TlsTransport(loop, tls, protocol)
    transport.start()
    return transport


async def _connect(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    """A connected non-blocking TCP socket to the first of ``host``'s addresses that answers."""
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError = OSError(f"no address for {host}:{port}")
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, address)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
        except BaseException:
            sock.close()
            raise
    raise error


class Handshake:
    """``do_handshake`` again each time the socket is ready for what OpenSSL waits for;
    ``done`` resolves when it completes or fails. The owner closes the socket on a failure."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tls: ssl.SSLSocket) -> None:
        self.loop = loop
        self.tls = tls
        self.fd = tls.fileno()
        self.done: asyncio.Future[None] = loop.create_future()
        self.reading = False  # the callback armed on the socket's readiness, if any
        self.writing = False
        self.step()

    def disarm(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.fd)
        if self.writing:
            self.writing = False
            self.loop.remove_writer(self.fd)

    def cancel(self) -> None:
        """Stop waiting (a timeout): ``done`` is cancelled."""
        self.disarm()
        self.done.cancel()

    def step(self) -> None:
        self.disarm()
        if self.done.done():
            return
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            self.reading = True
            self.loop.add_reader(self.fd, self.step)
        except ssl.SSLWantWriteError:
            self.writing = True
            self.loop.add_writer(self.fd, self.step)
        except BaseException as exc:
            self.done.set_exception(exc)
        else:
            self.done.set_result(None)
