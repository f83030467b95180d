"""One downstream connection: bytes in, requests out to the pipeline, responses back in order.

Thin glue around the parser: it arms the timers (request headers -> 408, idle keep-alive
-> close), keeps pipelined requests in order (a later request waits until the one before
it has answered; past ``max_pipelined`` waiting, reading pauses), applies back-pressure
(reading pauses while a request body has nowhere to go or the upstream cannot take more;
the upstream stops being read while this side's write buffer is full), and switches to a
raw tunnel after a 101. A protocol error answers with its status and closes; nothing of
that request is forwarded.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..config.model import DownstreamTimeouts, Limits
from ..errors import DownstreamProtocolError, LocalReply
from ..exchange import Exchange
from ..http.headers import is_valid_request_id
from ..http.message import RequestHead
from ..http.request_parser import RequestParser
from ..http.writer import local_reply
from ..deadline import Deadline
from .stream import Stream

__all__ = ["DownstreamConnection", "ListenerContext", "ServerState"]

LINGER_SECONDS = 2.0  # how long a closing connection keeps reading what the client still sends
LINGER_BYTES = 64 * 1024 * 1024  # ... and how much of it, at most (time is the real bound)


@dataclass(slots=True)
class ServerState:
    """What the sidecar tracks across listeners: for limits and an orderly drain."""

    connections: set[DownstreamConnection] = field(default_factory=set)
    draining: bool = False
    drained: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(slots=True)
class ListenerContext:
    """Everything a connection of one listener needs, built once per listener."""

    name: str
    service: str
    limits: Limits
    timeouts: DownstreamTimeouts
    state: ServerState
    start: Callable[[Stream], None]  # the pipeline: takes the exchange from here
    abort: Callable[[Stream], None]  # the downstream went away mid-exchange
    refuse: Callable[[Stream, LocalReply], None]  # end an exchange in flight with this reply
    current_snapshot: Callable[[], object]
    on_protocol_error: Callable[[DownstreamConnection, DownstreamProtocolError], None]
    scheme: bytes = b"http"
    peer_identity: Callable[[asyncio.Transport], str | None] | None = None
    connections: int = 0
    # Every connection of the listener reads into this one buffer: the loop runs one
    # callback at a time and the parser consumes a read before returning, so nothing is
    # allocated per read (uvloop's TLS layer would otherwise allocate 256 KiB per read).
    read_buffer: bytearray = field(default_factory=lambda: bytearray(256 * 1024))


class DownstreamConnection(asyncio.BufferedProtocol):
    BLOCK_PIPELINE = 1
    BLOCK_BODY = 2
    BLOCK_UPSTREAM = 4

    def __init__(self, ctx: ListenerContext, loop: asyncio.AbstractEventLoop) -> None:
        # Global state
        self.ctx = ctx
        self.loop = loop
        # Per-connection state
        self.transport: asyncio.Transport | None = None
        self.parser = RequestParser(self, ctx.limits)
        self.client = "-"
        self.peer_identity: str | None = None
        self.streams: deque[Stream] = deque()  # answered in this order
        self.receiving: Stream | None = None  # the request whose body is arriving
        self._to_start: Stream | None = None  # parsed in this read, started once it is all parsed
        self.closed = False
        self._blocked = 0
        self._write_paused = False
        # Timeouts: one cheap-to-move deadline for idle/request-headers, one for the exchange
        self._head_timer_armed = False  # the deadline is the 408 one, not the idle one
        self._deadline = Deadline(loop, self._on_deadline)
        self.route_deadline = Deadline(loop, self._on_route_deadline)
        self.try_deadline = Deadline(loop, self._on_try_deadline)
        self._corked = 0
        self._out: list[bytes] = []
        self._plain = True
        self._lingering = False  # replied and half-closed: reading (and dropping) what is left
        self._linger_left = 0

    @property
    def draining(self) -> bool:
        return self.ctx.state.draining

    # === asyncio.Protocol ===============================================================
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        ctx = self.ctx
        ctx.state.connections.add(self)
        ctx.connections += 1
        self._plain = transport.get_extra_info("sslcontext") is None
        peer = transport.get_extra_info("peername")
        self.client = peer[0] if peer else "-"
        transport.set_write_buffer_limits(high=64 * 1024)
        if ctx.peer_identity is not None:
            self.peer_identity = ctx.peer_identity(transport)
            if self.peer_identity is None:
                self.abort()  # not a valid workload identity: refused before any request
                return
        self._arm_idle()

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.ctx.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(memoryview(self.ctx.read_buffer)[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        """``data`` may be a view of the shared read buffer: whatever outlives this call
        is copied (the parser hands out copies already)."""
        if self._lingering:
            self._linger_left -= len(data)
            if self._linger_left < 0 and self.transport is not None:
                self.transport.close()
            return
        streams = self.streams
        if streams and streams[0].tunnel and self.parser.upgraded:
            upstream = streams[0].upstream
            if upstream is not None:
                streams[0].exchange.bytes_in += len(data)
                upstream.write(bytes(data))
            return
        if self.parser.upgraded:
            # bytes after an upgrade request, before the upstream said 101: keep (bounded)
            if streams:
                streams[-1].early_data += data
                if len(streams[-1].early_data) > 64 * 1024:
                    self.block_reading(self.BLOCK_BODY)
            return
        if not self._head_timer_armed:
            self._deadline.clear()
        try:
            rest = self.parser.feed(data)
        except DownstreamProtocolError as exc:
            self._protocol_error(exc)
            return
        to_start = self._to_start
        if to_start is not None:
            # Only now: a framing error later in this same read refuses the request before
            # a single byte of it went upstream.
            self._to_start = None
            self.ctx.start(to_start)
        if self.parser.upgraded and streams:
            streams[-1].early_data = rest
        if self.parser.mid_head and not self._head_timer_armed:
            self._arm_head_timer()

    def eof_received(self) -> bool | None:
        # A half-closed client gets its in-flight responses; then we close. (TLS transports
        # cannot stay half-open: uvloop warns when asked to.)
        if self._lingering:
            return False  # the client has stopped sending: the transport closes now
        if not self.streams:
            self.close()
        return self._plain

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._deadline.cancel()
        self.route_deadline.cancel()
        self.try_deadline.cancel()
        ctx = self.ctx
        ctx.state.connections.discard(self)
        ctx.connections -= 1
        self._out.clear()
        for stream in list(self.streams):
            if not stream.finished:
                ctx.abort(stream)
        self.streams.clear()
        if ctx.state.draining and not ctx.state.connections:
            ctx.state.drained.set()

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.streams and self.streams[0].upstream is not None:
            up = self.streams[0].upstream
            if up.transport is not None and not up.closed:
                up.transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.streams and self.streams[0].upstream is not None:
            up = self.streams[0].upstream
            if up.transport is not None and not up.closed:
                up.transport.resume_reading()

    # === RequestSink (called by the parser) ==============================================
    def on_request(self, head: RequestHead) -> None:
        self._head_timer_armed = False
        self._deadline.clear()
        rid = head.request_id
        if rid is not None and is_valid_request_id(rid):
            request_id = rid.decode("ascii")
        else:
            request_id = "%032x" % random.getrandbits(128)
            if rid is not None:
                head.remove_headers(b"x-request-id")  # unusable: replaced, not duplicated
            head.headers.append((b"x-request-id", request_id.encode()))
        exchange = Exchange(request=head, listener=self.ctx.name, downstream_address=self.client,
                            request_id=request_id, start=time.monotonic(),
                            peer_identity=self.peer_identity)
        stream = Stream(self, head, exchange, self.ctx.current_snapshot())
        self.receiving = stream
        self.streams.append(stream)
        if len(self.streams) == 1:
            self._to_start = stream
        elif len(self.streams) > self.ctx.limits.max_pipelined:
            self.block_reading(self.BLOCK_PIPELINE)

    def on_body(self, chunk: bytes) -> None:
        stream = self.receiving
        if stream is not None and not stream.finished:
            stream.feed_body(chunk)
        # else: answered already (a local reply); the body is read and dropped

    def on_request_end(self) -> None:
        stream = self.receiving
        self.receiving = None
        if stream is not None:
            stream.end_body()

    # === exchanges ========================================================================
    def stream_done(self, stream: Stream) -> None:
        """The pipeline finished ``stream``: answer the next pipelined request, or idle."""
        if not self.streams or self.streams[0] is not stream:
            return
        self.streams.popleft()
        if self.closed:
            return
        if not stream.keep_alive or not stream.response_done or self.draining:
            self.close(linger=not stream.body_done)
            return
        self.unblock_reading(self.BLOCK_PIPELINE | self.BLOCK_BODY | self.BLOCK_UPSTREAM)
        if self.streams:
            self.ctx.start(self.streams[0])
        elif not (self.parser.mid_head):
            self._arm_idle()

    def body_over_limit(self, stream: Stream, limit: int) -> None:
        """A chunked body grew past its service's limit: refuse it as the parser would."""
        self._protocol_error(DownstreamProtocolError(
            f"request body exceeds {stream.exchange.service}'s limit of {limit} bytes", 413,
            "payload_too_large"))

    # === flow control =====================================================================
    def block_reading(self, reason: int) -> None:
        if not self._blocked and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self._blocked |= reason

    def unblock_reading(self, reason: int) -> None:
        if not self._blocked & reason:
            return
        self._blocked &= ~reason
        if not self._blocked and self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if self._corked:
            self._out.append(data)
        elif self.transport is not None and not self.closed:
            self.transport.write(data)

    def cork(self) -> None:
        """Collect writes until ``uncork``: a response head and body that arrive in one
        upstream read leave in one write (one syscall instead of two or three)."""
        self._corked += 1

    def uncork(self) -> None:
        self._corked -= 1
        if not self._corked and self._out:
            self._flush()

    def _flush(self) -> None:
        out = self._out
        if self.transport is not None and not self.closed:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()

    # === closing ==========================================================================
    def close(self, *, linger: bool = False) -> None:
        """Close after what is written. ``linger``: the client may still be sending (a reply
        went out before its request ended): half-close, then read and drop what comes for a
        while (RFC 9112 §9.6), or the kernel answers the unread bytes with a reset and the
        client never reads the reply."""
        if self._out:
            self._flush()
        transport = self.transport
        self.closed = True
        if transport is None or transport.is_closing():
            return
        if linger and self._plain and not self._lingering and transport.can_write_eof():
            self._lingering = True
            self._linger_left = LINGER_BYTES
            transport.write_eof()
            self._head_timer_armed = False
            self._deadline.set_in(LINGER_SECONDS)
            if self._blocked:
                self._blocked = 0
                transport.resume_reading()
            return
        transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self.closed = True

    def shutdown(self) -> None:
        """Drain: an idle connection closes now; a busy one after its current response."""
        if not self.streams:
            self.close()

    # === timers ===========================================================================
    def _arm_idle(self) -> None:
        self._head_timer_armed = False
        self._deadline.set_in(self.ctx.timeouts.idle)

    def _arm_head_timer(self) -> None:
        self._head_timer_armed = True
        self._deadline.set_in(self.ctx.timeouts.request_headers)

    def _on_deadline(self) -> None:
        if self._lingering:
            if self.transport is not None:
                self.transport.close()
            return
        if self._head_timer_armed:
            self._head_timer_armed = False
            self._protocol_error(DownstreamProtocolError(
                f"request headers not received within {self.ctx.timeouts.request_headers}s",
                408, "request_timeout"))
        elif not self.streams:
            self.close()  # keep-alive idle

    def _on_route_deadline(self) -> None:
        if self.streams:
            stream = self.streams[0]
            if stream.driver is not None and not stream.finished:
                stream.driver.on_timeout(stream)

    def _on_try_deadline(self) -> None:
        if self.streams:
            stream = self.streams[0]
            if stream.driver is not None and not stream.finished:
                stream.driver.on_try_timeout(stream)

    def _protocol_error(self, exc: DownstreamProtocolError) -> None:
        """Answer a malformed request (if nothing else is being answered) and close."""
        self.ctx.on_protocol_error(self, exc)
        unstarted = self._to_start
        if unstarted is not None:
            self._to_start = None
            self.streams.remove(unstarted)  # refused before it was forwarded anywhere
        if self.streams:
            stream = self.streams[0]
            if stream is self.receiving and not stream.response_started and not stream.finished:
                # its body broke after the head went upstream: cut the upstream off (it never
                # gets a complete request) and tell the client why
                stream.keep_alive = False
                self.ctx.refuse(stream, exc.reply())
                self.close(linger=True)
                return
            self.abort()  # a response is under way: cutting the connection is all that is left
            return
        data, _ = local_reply(exc.reply(), self.ctx.service, [(b"connection", b"close")])
        self.write(data)
        self.close(linger=True)
