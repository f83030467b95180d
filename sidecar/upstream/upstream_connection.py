"""One connection to an upstream endpoint: writes a request, parses the response and hands
it, piece by piece, to the downstream stream that asked for it.

Rules: a connection serves one exchange at a time (no upstream pipelining); it is reused
only when the response ended cleanly, both sides allow keep-alive and it was not a HEAD
(llhttp cannot be told to skip a HEAD response's body). A connection that receives bytes
or EOF while idle is dead and the pool throws it away before reuse.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

from ..errors import ProxyError, UpstreamProtocolError, UpstreamReset
from ..http.message import ResponseHead
from ..http.response_parser import ResponseParser

if TYPE_CHECKING:
    from .pool import Pool

__all__ = ["UpstreamConnection", "UpstreamListener"]


class UpstreamListener(Protocol):
    """The downstream side of the exchange this connection is serving."""

    def on_response_head(self, head: ResponseHead) -> None: ...
    def on_response_body(self, chunk: bytes) -> None: ...
    def on_response_end(self) -> None: ...
    def on_tunnel_data(self, data: bytes) -> None: ...
    def on_tunnel_closed(self) -> None: ...
    def pause_request_body(self) -> None: ...
    def resume_request_body(self) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    __slots__ = ("pool", "transport", "parser", "listener", "done", "closed", "reusable",
                 "requests", "tunnel", "_idle_timer", "_loop", "ssl_object", "_head")

    def __init__(self, pool: Pool, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser: ResponseParser | None = None
        self.listener: UpstreamListener | None = None
        self.done: asyncio.Future[ResponseHead | None] | None = None
        self.closed = False
        self.reusable = False
        self.tunnel = False
        self.requests = 0
        self._idle_timer: asyncio.TimerHandle | None = None
        self.ssl_object: object | None = None
        self._head: ResponseHead | None = None

    def __repr__(self) -> str:
        state = "CLOSED" if self.closed else ("ACTIVE" if self.listener else "IDLE")
        return f"<UpstreamConnection {self.pool.address_text} {state} requests={self.requests}>"

    # --- the pool's view ----------------------------------------------------------------
    def is_available(self) -> bool:
        """Idle, open, and nothing arrived since the last response: safe to send on."""
        return not self.closed and self.listener is None and self.transport is not None \
            and not self.transport.is_closing()

    def start(self, listener: UpstreamListener, head_only: bool) -> asyncio.Future[ResponseHead | None]:
        """Bind this connection to one exchange. The returned future resolves when the
        response has ended (with its head) or fails with a ProxyError."""
        self._cancel_idle_timer()
        self.listener = listener
        self.requests += 1
        self.reusable = False
        self.parser = ResponseParser(self)
        self.parser.head_only = head_only
        self.done = self._loop.create_future()
        self._head = None
        return self.done

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def response_started(self) -> bool:
        return self.parser is not None and self.parser.started

    def finish(self) -> bool:
        """The exchange is over. Returns whether the connection can go back to the pool."""
        self.listener = None
        self.parser = None
        if not self.reusable or self.closed:
            self.close()
            return False
        return True

    def arm_idle_timer(self, timeout: float) -> None:
        self._idle_timer = self._loop.call_later(timeout, self.close)

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def close(self) -> None:
        self._cancel_idle_timer()
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    def abort(self) -> None:
        self._cancel_idle_timer()
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    # --- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=64 * 1024)
        self.ssl_object = transport.get_extra_info("ssl_object")

    def data_received(self, data: bytes) -> None:
        listener = self.listener
        if listener is None:
            self.close()  # bytes on an idle connection: it is out of sync, never reuse it
            return
        if self.tunnel:
            listener.on_tunnel_data(data)
            return
        parser = self.parser
        assert parser is not None
        try:
            rest = parser.feed(data)
        except ProxyError as exc:
            self._fail(exc)
            self.abort()
            return
        if parser.upgraded and self._head is not None and self._head.status == 101:
            self.tunnel = True
            if rest:
                listener.on_tunnel_data(rest)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_idle_timer()
        self.closed = True
        self.pool.on_connection_lost(self)
        listener = self.listener
        if listener is None:
            return
        if self.tunnel:
            listener.on_tunnel_closed()
            return
        parser = self.parser
        head = self._head
        if parser is not None and not parser.done and head is not None \
                and head.content_length is None and not head.chunked:
            # a close-delimited body: EOF is its end (llhttp would need llhttp_finish)
            parser.done = True
            listener.on_response_end()
            self._resolve()
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
    def on_response_head(self, head: ResponseHead) -> None:
        self._head = head
        assert self.listener is not None
        self.listener.on_response_head(head)

    def on_response_body(self, chunk: bytes) -> None:
        assert self.listener is not None
        self.listener.on_response_body(chunk)

    def on_response_end(self) -> None:
        head = self._head
        assert self.listener is not None and head is not None
        parser = self.parser
        self.reusable = head.keep_alive and head.status != 101 and parser is not None \
            and not parser.head_only
        if head.status != 101:
            self.listener.on_response_end()
        self._resolve()

    def _resolve(self) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(self._head)

    def _fail(self, exc: ProxyError) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(exc)
        else:
            self.abort()
