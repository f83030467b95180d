"""One downstream connection: bytes in, requests out to the pipeline, responses back in order.

Thin glue around the parser: it arms the timers (request headers -> 408, idle keep-alive
-> close, tunnel idle -> close), keeps pipelined requests in order (a later request waits
until the one before it has answered; past ``max_pipelined`` waiting, the rest of a read
stays unparsed bytes and reading pauses), applies back-pressure (reading pauses while a
request body has nowhere to go or the upstream cannot take more; the upstream stops being
read while this side's write buffer is full), and switches to a raw tunnel after a 101. A
protocol error answers with its status and closes; nothing of that request is forwarded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, cast

from ..config.model import DownstreamTimeouts, Limits
from ..errors import DownstreamProtocolError, LocalReply
from ..exchange import Exchange
from ..http.headers import RequestIds, is_valid_request_id
from ..http.message import RequestHead
from ..http.request_parser import RequestParser
from ..http.writer import LengthLine, header_line, local_reply
from ..deadline import Deadline
from ..heap import LARGE_READ, keep_heap_slack
from ..pipeline import Pipeline
from ..snapshot_slot import SnapshotSlot
from ..upstream.tls_protocol import TlsProtocol
from .stream import Stream


__all__ = ["DownstreamConnection", "ListenerContext", "ServerState"]

LINGER_SECONDS: Final = 2.0  # how long a closing connection keeps reading what the client still sends
LINGER_BYTES: Final = 64 * 1024 * 1024  # ... and how much of it, at most (time is the real bound)
MIN_HEAD: Final = len(b"GET / HTTP/1.0\r\n\r\n")  # the shortest request head llhttp accepts
# Bound once: compiled, ``time.monotonic()`` reads the module's attribute at every call
# (~190 instructions); a Final is a C static.
_MONOTONIC: Final = time.monotonic


@dataclass(slots=True)
class ServerState:
    """What the sidecar tracks across listeners: for limits and an orderly drain."""

    connections: set[DownstreamConnection] = field(default_factory=set)
    draining: bool = False
    # sidecar.overload: while set, every new request gets this reply (503 OL) before any
    # filter, route or upstream sees it, and keep-alive is off
    overload: LocalReply | None = None
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
    # the snapshot new exchanges run under (``hold``: held by the exchange until it finishes);
    # the slot's class, not a bound method: compiled, ``hold`` is then a native call
    snapshots: SnapshotSlot
    on_protocol_error: Callable[[DownstreamConnection, DownstreamProtocolError], None]
    scheme: bytes = b"http"
    peer_identity: Callable[[asyncio.Transport], str | None] | None = None
    connections: int = 0
    request_ids: RequestIds = field(default_factory=RequestIds)  # for requests that bring none
    # the pipeline whose ``start`` is ``start``, when it is one (the tests' fakes are not):
    # compiled, its ``start`` is then a native call, where the bound method went through its
    # wrapper (~110 instructions an exchange, callgrind)
    pipeline: Pipeline | None = None


class DownstreamConnection(asyncio.Protocol):
    BLOCK_PIPELINE = 1
    BLOCK_BODY = 2
    BLOCK_UPSTREAM = 4

    def __init__(self, ctx: ListenerContext, loop: asyncio.AbstractEventLoop) -> None:
        # Global state
        self.ctx = ctx
        self.loop = loop
        # Per-connection state
        self.transport: asyncio.Transport | None = None
        # the transport's ``write``, bound once: compiled, a call by name looks the method up
        # on every call (~150 instructions, callgrind); let go with the transport
        self._send: Callable[[bytes], object] | None = None
        # the transport, when it is our TLS protocol: its ``write`` is then a native call,
        # where ``_send`` went through the bound method's wrapper (~110 instructions a write)
        self._tls: TlsProtocol | None = None
        self.parser = RequestParser(self, ctx.limits, conn=self)
        self.client = "-"
        self.peer_identity: str | None = None
        # what goes upstream in x-forwarded-for and x-pake-peer-identity (whole header lines
        # when they are the header's whole value), encoded once a connection, not once a request
        self.client_bytes = b"-"
        self.forwarded_for_line = b"x-forwarded-for: -\r\n"
        self.peer_identity_line: bytes | None = None
        # the x-forwarded-for line for a request that came with one: the last value relayed
        # and its line. A client (another sidecar, a load balancer) sends the same value on
        # every request of a connection; a compare of bytes is cheaper than two concatenations
        # and a line made again (~550 instructions a request, callgrind)
        self._relayed_for = b""
        self._relayed_for_line = b""
        # the content-length lines of its requests upstream and of its responses
        self.request_length = LengthLine()
        self.response_length = LengthLine()
        # answered in this order. A list, not a deque: compiled, a list's append, [0] and pop(0)
        # are direct calls, a deque's are looked up by name (~200 instructions each); it holds
        # at most max_pipelined + 1
        self.streams: list[Stream] = []
        self.receiving: Stream | None = None  # the request whose body is arriving
        self._started: Stream | None = None  # the head of the queue, once handed to the pipeline
        self._unparsed = b""  # bytes past the pipelining bound, parsed as exchanges finish
        self._unparsed_at = 0
        self._parsing = False
        self._advancing = False
        self.closed = False
        self._blocked = 0
        self._write_paused = False
        # Timeouts: one cheap-to-move deadline for idle/request-headers, one for the exchange
        self._head_timer_armed = False  # the deadline is the 408 one, not the idle one
        self._deadline = Deadline(loop, self._on_deadline)
        self.route_deadline = Deadline(loop, self._on_route_deadline)
        self.try_deadline = Deadline(loop, self._on_try_deadline)
        self._ended_at = -1.0  # the last exchange's end, while ``stream_done`` advances
        self._corked = 0
        # what corked writes gather: up to two pieces (a response's head and its body, as one
        # upstream read brings them) joined into ``_held``, more into ``_out`` (``write``)
        self._held = b""
        self._held_pieces = 0
        self._out: list[bytes] = []
        self._plain = True
        self._lingering = False  # replied and half-closed: reading (and dropping) what is left
        self._linger_left = 0
        self._client_done = False  # the client half-closed: its last response out, we close

    def forwarded_for(self, received: bytes | None) -> bytes:
        """The x-forwarded-for line for upstream: the client's address after what the request
        said (``received``), or alone."""
        if received is None:
            return self.forwarded_for_line
        if received != self._relayed_for:
            self._relayed_for = received
            self._relayed_for_line = header_line(b"x-forwarded-for", received + b", " + self.client_bytes)
        return self._relayed_for_line

    @property
    def draining(self) -> bool:
        """No keep-alive: the sidecar drains, or is overloaded (sidecar.overload)."""
        state = self.ctx.state
        return state.draining or state.overload is not None

    # === asyncio.Protocol ===============================================================
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream server hands a protocol a (read-write) Transport; asyncio types it as
        # the base class for every kind of protocol.
        transport = self.transport = cast(asyncio.Transport, transport)
        self._send = transport.write
        self._tls = transport if isinstance(transport, TlsProtocol) else None
        ctx = self.ctx
        ctx.state.connections.add(self)
        ctx.connections += 1
        self._plain = transport.get_extra_info("sslcontext") is None
        peer = transport.get_extra_info("peername")
        self.client = peer[0] if peer else "-"
        self.client_bytes = self.client.encode()
        self.forwarded_for_line = header_line(b"x-forwarded-for", self.client_bytes)
        transport.set_write_buffer_limits(high=64 * 1024)
        if ctx.peer_identity is not None:
            self.peer_identity = ctx.peer_identity(transport)
            if self.peer_identity is None:
                self.abort()  # not a valid workload identity: refused before any request
                return
            self.peer_identity_line = header_line(b"x-pake-peer-identity", self.peer_identity.encode())
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        """Reads arrive as bytes: uvloop's of a plain connection, ``TlsProtocol``'s a
        record's plaintext each (see ``UpstreamConnection``)."""
        n = len(data)
        if n >= LARGE_READ:
            keep_heap_slack()  # a large body: its reads are large allocations (sidecar/heap.py)
        if self._lingering:
            self._linger_left -= n
            if self._linger_left < 0 and self.transport is not None:
                self.transport.close()
            return
        streams = self.streams
        if self.parser.upgraded:
            if streams and streams[0].tunnel:
                upstream = streams[0].upstream
                if upstream is not None:
                    streams[0].exchange.bytes_in += n
                    self._deadline.set_in(self.ctx.timeouts.tunnel_idle)  # (moves, no re-arm)
                    upstream.write(data)
            elif streams:
                # bytes after an upgrade request, before the upstream said 101: keep (bounded)
                streams[-1].early_data += data
                if len(streams[-1].early_data) > 64 * 1024:
                    self.block_reading(self.BLOCK_BODY)
            return
        if not self._head_timer_armed:
            self._deadline.clear()
        if not self._parse(data, 0, n):
            return
        # Only now: a framing error later in this same read refuses the request before a
        # single byte of it went upstream.
        self._advance()
        if self.parser.mid_head and not self._head_timer_armed:
            self._arm_head_timer()

    def _parse(self, buf: bytes, pos: int, end: int) -> bool:
        """Feed ``buf[pos:end]`` to the parser, never more heads than the pipeline may
        still hold (``max_pipelined`` waiting behind the one being answered); the rest is
        kept unparsed, as bytes (at most one read), and reading pauses until an exchange
        finishes. A bound on requests held, whatever one read carries. False: refused."""
        parser = self.parser
        streams = self.streams
        ctx = self.ctx
        room = ctx.limits.max_pipelined + 1
        # a view only to feed part of ``buf``: a read is mostly fed whole, and
        # ``memoryview(buf)`` costs ~1k instructions compiled (a builtin looked up by name and
        # a type call)
        view: memoryview | None = None
        self._parsing = True
        try:
            while pos < end:
                heads = room - len(streams)
                if heads <= 0:
                    self._unparsed, self._unparsed_at = buf, pos  # (held bytes, fed again)
                    self.block_reading(self.BLOCK_PIPELINE)
                    return True
                # a head is at least MIN_HEAD bytes: a short read needs no look
                stop = end if end - pos <= heads * MIN_HEAD else parser.head_room(buf, pos, end, heads)
                if pos or stop < len(buf):
                    if view is None:
                        view = memoryview(buf)
                    rest = parser.feed(view[pos:stop])
                else:
                    rest = parser.feed(buf)
                if self.closed:
                    return False
                if parser.upgraded:
                    if streams:
                        streams[-1].early_data = rest + buf[stop:end] if stop < end else rest
                    return True
                pos = stop
        except DownstreamProtocolError as exc:
            self._unparsed = b""
            self._protocol_error(exc)
            return False
        finally:
            self._parsing = False
        return True

    def _advance(self) -> None:
        """Start the exchange at the head of the queue, parsing held bytes as room opens.
        A loop, not recursion: an exchange answered locally finishes inside ``start``, and
        thousands of them must not nest."""
        if self._advancing:
            return  # the loop below goes on
        self._advancing = True
        streams = self.streams
        try:
            while not self.closed:
                if streams and streams[0] is not self._started:
                    stream = self._started = streams[0]
                    overload = self.ctx.state.overload
                    if overload is None:
                        pipeline = self.ctx.pipeline
                        if pipeline is not None:
                            pipeline.start(stream)
                        else:
                            self.ctx.start(stream)
                    else:
                        self.ctx.refuse(stream, overload)  # (before any filter or route)
                    continue
                held = self._unparsed
                # (``len``: compiled, a bytes object's truth is a generic call)
                if len(held) and len(streams) <= self.ctx.limits.max_pipelined:
                    self._unparsed = b""
                    if not self._parse(held, self._unparsed_at, len(held)):
                        return
                    continue
                break
        finally:
            self._advancing = False
        if self.closed:
            return
        if len(self._unparsed) == 0 and len(streams) <= self.ctx.limits.max_pipelined:
            self.unblock_reading(self.BLOCK_PIPELINE)
        if not streams:
            if self._client_done and len(self._unparsed) == 0:
                self.close()  # nothing more will come: not even the rest of a head begun
            elif not self.parser.mid_head:
                self._arm_idle()

    def eof_received(self) -> bool | None:
        # A half-closed client gets its in-flight responses (and those of requests it
        # pipelined before its FIN); then we close (``_advance``), not after the idle timeout.
        # A client that closed outright is one too: its FIN looks the same. (TLS connections
        # cannot stay half-open: OpenSSL 3 ends a session at a FIN without close_notify, and
        # answers a later write with an alert; upstream.tls_protocol closes on EOF.)
        if self._lingering:
            return False  # the client has stopped sending: the transport closes now
        if not self.streams:
            self.close()
        else:
            self._client_done = True
        return self._plain

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = self._send = self._tls = None  # the TLS state goes now, not with this object's cycles (see UpstreamConnection)
        self._deadline.cancel()
        self.route_deadline.cancel()
        self.try_deadline.cancel()
        ctx = self.ctx
        ctx.state.connections.discard(self)
        ctx.connections -= 1
        self._out.clear()
        self._held = b""
        self._held_pieces = 0
        self._unparsed = b""
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
        if rid is None or not is_valid_request_id(rid):
            if rid is not None:
                head.remove_headers(b"x-request-id")  # unusable: replaced, not duplicated
            # the id forwarded, as the caller's would be; the exchange's text of it is made
            # from the head's bytes when a log line asks (``Exchange.request_id``)
            head.request_id = raw = self.ctx.request_ids.take_raw()
            pair: tuple[bytes, ...] = (b"x-request-id", raw)
            cast("list[tuple[bytes, ...]]", head.pairs).append(pair)  # (after the block's lines)
            head.request_id_pair = pair
        exchange = Exchange(request=head, listener=self.ctx.name, downstream_address=self.client,
                            request_id="", start=_MONOTONIC(), peer_identity=self.peer_identity)
        stream = Stream(self, head, exchange, self.ctx.snapshots.hold())
        self.receiving = stream
        self.streams.append(stream)  # (``_parse`` feeds no more heads than there is room for)

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
    def stream_done(self, stream: Stream, now: float = -1.0) -> None:
        """The pipeline finished ``stream``: answer the next pipelined request, or idle.
        ``now``: the monotonic clock's time when the caller read it at the exchange's end
        (else -1.0): the idle timer then counts from it, with no read of its own."""
        streams = self.streams
        if not streams or streams[0] is not stream:
            return
        if len(streams) == 1:
            # cleared, not popped: a pop that empties a list reallocates it to no items, which
            # pymalloc hands to malloc, and the next append reallocates through malloc again
            # (~550 instructions the two, callgrind); a clear frees it and the append takes
            # pymalloc's
            streams.clear()
        else:
            streams.pop(0)
        self._started = None
        if self.closed:
            return
        if not stream.keep_alive or not stream.response_done or self.draining:
            self.close(linger=not stream.body_done)
            return
        self.unblock_reading(self.BLOCK_BODY | self.BLOCK_UPSTREAM)
        if not self._parsing:  # (while parsing, the parse's caller starts the next one)
            self._ended_at = now  # for ``_arm_idle``, within this call only
            self._advance()
            self._ended_at = -1.0

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
            # Two pieces are joined by one concatenation: a list to gather them, its items'
            # array and a join cost ~300 instructions more an exchange (callgrind). A third
            # goes to the list, so a read of many small chunks is not copied again and again.
            out = self._out
            pieces = self._held_pieces
            if out:
                out.append(data)
            elif pieces == 0:
                self._held = data
                self._held_pieces = 1
            elif pieces == 1:
                self._held = self._held + data
                self._held_pieces = 2
            else:
                out.append(self._held)
                out.append(data)
                self._held = b""
                self._held_pieces = 0
        elif not self.closed:
            self._transmit(data)

    def cork(self) -> None:
        """Collect writes until ``uncork``: a response head and body that arrive in one
        upstream read leave in one write (one syscall instead of two or three)."""
        self._corked += 1

    def uncork(self) -> None:
        self._corked -= 1
        if not self._corked and (self._held_pieces or self._out):
            self._flush()

    def _flush(self) -> None:
        out = self._out
        if out:
            data = b"".join(out)
            out.clear()
        else:
            data = self._held
        self._held = b""
        self._held_pieces = 0
        if not self.closed:
            self._transmit(data)

    def _transmit(self, data: bytes) -> None:
        tls = self._tls
        if tls is not None:
            tls.write(data)
        elif self._send is not None:
            self._send(data)

    # === closing ==========================================================================
    def close(self, *, linger: bool = False) -> None:
        """Close after what is written. ``linger``: the client may still be sending (a reply
        went out before its request ended): half-close, then read and drop what comes for a
        while (RFC 9112 §9.6), or the kernel answers the unread bytes with a reset and the
        client never reads the reply."""
        if self._held_pieces or self._out:
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
        ended = self._ended_at
        if ended >= 0.0:
            self._deadline.set_at(ended + self.ctx.timeouts.idle)
        else:
            self._deadline.set_in(self.ctx.timeouts.idle)

    def _arm_head_timer(self) -> None:
        self._head_timer_armed = True
        self._deadline.set_in(self.ctx.timeouts.request_headers)

    def tunnel_opened(self) -> None:
        """101: the connection is a tunnel; its deadline is now the tunnel's idle timeout,
        moved on by bytes either way."""
        self._head_timer_armed = False
        self._deadline.set_in(self.ctx.timeouts.tunnel_idle)

    def tunnel_write(self, data: bytes) -> None:
        """Tunnel bytes from the upstream: written, and the tunnel is not idle."""
        self._deadline.set_in(self.ctx.timeouts.tunnel_idle)
        self.write(data)

    def _on_deadline(self) -> None:
        if self._lingering:
            if self.transport is not None:
                self.transport.close()
            return
        streams = self.streams
        if streams and streams[0].tunnel:
            # no byte either way for tunnel_idle: close both sides (the router closes the
            # upstream and ends the exchange, which closes this connection)
            stream = streams[0]
            stream.exchange.reason = f"tunnel idle for {self.ctx.timeouts.tunnel_idle}s"
            if stream.driver is not None and not stream.finished:
                stream.driver.on_tunnel_closed(stream)
            else:
                self.abort()
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
            if stream.finished:
                return
            if stream.driver is not None:
                stream.driver.on_timeout(stream)
            elif stream.on_collected is not None:
                # a filter is still waiting for the body: a stalled upload (a slowloris)
                # gets its 408 and the connection closes
                stream.on_collected = None
                stream.keep_alive = False
                self.ctx.refuse(stream, DownstreamProtocolError(
                    f"request body not received within the route timeout {stream.timeout}s",
                    408, "request_timeout").reply())

    def _on_try_deadline(self) -> None:
        if self.streams:
            stream = self.streams[0]
            if stream.driver is not None and not stream.finished:
                stream.driver.on_try_timeout(stream)

    def _protocol_error(self, exc: DownstreamProtocolError) -> None:
        """Answer a malformed request (if nothing else is being answered) and close."""
        self.ctx.on_protocol_error(self, exc)
        self._unparsed = b""
        if self.streams and self.streams[0] is not self._started:
            self.streams.pop(0)  # refused before it was forwarded anywhere
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
        data, _ = local_reply(exc.reply(), self.ctx.service, [b"connection: close\r\n"])
        self.write(data)
        self.close(linger=True)
