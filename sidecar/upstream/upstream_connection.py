"""One connection to an upstream endpoint: writes a request, parses the response and hands
it, piece by piece, to the stream that asked for it.

Rules: a connection serves one exchange at a time (no upstream pipelining); it is reused
only when the response ended cleanly, both sides allow keep-alive and it was not a HEAD
(llhttp cannot be told to skip a HEAD response's body). A connection that receives bytes
or EOF while idle is dead and the pool throws it away before reuse. Everything here is a
callback: no task or future per request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from ..deadline import Deadline
from ..heap import LARGE_READ, keep_heap_slack
from ..errors import ProxyError, UpstreamReset
from ..http.message import ResponseHead
from ..http.response_parser import ResponseParser
from .tls_protocol import TlsProtocol

if TYPE_CHECKING:
    from ..listener.stream import Stream
    from .pool import Pool

__all__ = ["UpstreamConnection"]


class UpstreamConnection(asyncio.Protocol):
    def __init__(self, pool: Pool, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self._send: Callable[[bytes], object] | None = None  # transport.write, bound once (as downstream)
        # transport.is_closing, bound once too: the pool asks it for every request sent on a
        # kept connection, and through the transport's type it was a call by name (~200
        # instructions of ~250, callgrind)
        self._is_closing: Callable[[], bool] | None = None
        self._tls: TlsProtocol | None = None  # the transport, when TLS: written natively (as downstream)
        self.parser: ResponseParser | None = None
        # the downstream side of the exchange being served: the listener's ``Stream``, named for
        # type checking only (the listener imports this module). A concrete type, not a
        # protocol: compiled, its methods (cork, the response's pieces) are native calls,
        # where a call through a protocol was a call by name, ~250 instructions (callgrind)
        self.listener: Stream | None = None
        self.closed = False
        self.reusable = False
        self.tunnel = False
        self.requests = 0
        self._idle = Deadline(loop, self.close)  # pool idle timeout
        self.peer_identity: str | None = None  # what the upstream proved in the TLS handshake
        self.limit: object = None  # the cluster connection-limit slot this connection holds
        self.head: ResponseHead | None = None

    def __repr__(self) -> str:
        state = "CLOSED" if self.closed else ("ACTIVE" if self.listener else "IDLE")
        return f"<UpstreamConnection {self.pool.address_text} {state} requests={self.requests}>"

    # --- the pool's view ----------------------------------------------------------------
    def is_available(self) -> bool:
        """Idle, open, and nothing arrived since the last response: safe to send on."""
        is_closing = self._is_closing
        return not self.closed and self.listener is None and is_closing is not None and not is_closing()

    def start(self, listener: Stream, head_only: bool) -> None:
        """Bind this connection to one exchange until ``finish``."""
        self._idle.clear()
        self.listener = listener
        self.requests += 1
        self.reusable = False
        self.head = None
        parser = self.parser
        if parser is None or not parser.reusable():
            parser = self.parser = ResponseParser(self, conn=self)
        parser.begin(head_only)

    def write(self, data: bytes) -> None:
        tls = self._tls
        if tls is not None:
            tls.write(data)
            return
        send = self._send
        if send is not None:
            send(data)

    def response_started(self) -> bool:
        return self.parser is not None and self.parser.started

    def finish(self) -> bool:
        """The exchange is over. Returns whether the connection can go back to the pool."""
        self.listener = None
        if not self.reusable or self.closed:
            self.close()
            return False
        return True

    def arm_idle_timer(self, timeout: float, now: float = -1.0) -> None:
        if now >= 0.0:
            self._idle.set_at(now + timeout)
        else:
            self._idle.set_in(timeout)

    def close(self) -> None:
        self._idle.cancel()
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    def abort(self) -> None:
        self.closed = True
        self._idle.cancel()
        if self.transport is not None:
            self.transport.abort()

    # --- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream connection's transport is a Transport; asyncio types it as the base class.
        transport = self.transport = cast(asyncio.Transport, transport)
        self._send = transport.write
        self._is_closing = transport.is_closing
        self._tls = transport if isinstance(transport, TlsProtocol) else None
        transport.set_write_buffer_limits(high=64 * 1024)
        if self.pool.identify is not None:
            self.peer_identity = self.pool.identify(transport)

    # An asyncio.Protocol, not a BufferedProtocol: uvloop hands a plain connection's read over
    # as bytes, in one callback. Into a buffer, a read was two callbacks that each take the
    # GIL, and a view sliced for the parser: ~1.1k instructions more a read (callgrind). A
    # large body costs the same either way (sidecar/heap.py). ``TlsProtocol`` hands over
    # each record's plaintext as bytes too.
    def data_received(self, data: bytes) -> None:
        listener = self.listener
        if listener is None:
            self.close()  # bytes on an idle connection: it is out of sync, never reuse it
            return
        if self.tunnel:
            listener.on_tunnel_data(data)
            return
        if len(data) >= LARGE_READ:
            keep_heap_slack()  # a large body: its reads are large allocations (sidecar/heap.py)
        parser = self.parser
        assert parser is not None
        listener.cork()
        try:
            rest = parser.feed(data)
        except ProxyError as exc:
            self.abort()
            self._fail(exc)
            return
        finally:
            listener.uncork()
        if parser.upgraded and self.head is not None and self.head.status == 101:
            self.tunnel = True
            if rest:
                listener.on_tunnel_data(rest)

    def connection_lost(self, exc: Exception | None) -> None:
        self._idle.cancel()
        self.closed = True
        # This connection and its parser are in reference cycles (llhttp's callbacks, the
        # transport's bound methods) that only the cyclic GC frees; let go of the transport
        # now, and with it the TLS protocol, its memory BIOs and OpenSSL's state.
        # Kept until the GC, a new connection per request held 100+ MB of dead connections.
        self.transport = self._send = self._is_closing = self._tls = None
        self.pool.on_connection_lost(self)
        listener = self.listener
        if listener is None:
            return
        if self.tunnel:
            listener.on_tunnel_closed()
            return
        parser = self.parser
        head = self.head
        if parser is not None and not parser.done and head is not None \
                and head.content_length is None and not head.chunked:
            # a close-delimited body: EOF is its end (llhttp would need llhttp_finish)
            parser.done = True
            listener.on_response_end()
            return
        self._fail(UpstreamReset("upstream connection closed before the response completed"
                                 if parser is not None and parser.started
                                 else "upstream connection reset before any response byte"))

    def pause_writing(self) -> None:
        if self.listener is not None:
            self.listener.pause_request_body()

    def resume_writing(self) -> None:
        if self.listener is not None:
            self.listener.resume_request_body()

    # --- ResponseSink (called by the parser) ----------------------------------------------
    # The listener may let go of this connection inside one of these callbacks (a retriable
    # response is dropped at its head): llhttp then goes on calling with no one to tell.
    def on_response_head(self, head: ResponseHead) -> None:
        self.head = head
        if self.listener is not None:
            self.listener.on_response_head(head)

    def on_response_body(self, chunk: bytes) -> None:
        if self.listener is not None:
            self.listener.on_response_body(chunk)

    def on_response_end(self) -> None:
        head = self.head
        parser = self.parser
        if self.listener is None or head is None or parser is None:
            return
        self.reusable = head.keep_alive and head.status != 101 and not parser.head_only
        if head.status != 101:
            self.listener.on_response_end()

    def _fail(self, exc: ProxyError) -> None:
        listener = self.listener
        if listener is not None:
            listener.on_upstream_error(exc)
