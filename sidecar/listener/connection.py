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
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from ..config.model import DownstreamTimeouts, Limits
from ..errors import DownstreamProtocolError, LocalReply
from ..exchange import Exchange
from ..http.headers import is_valid_request_id
from ..http.message import RequestHead
from ..http.request_parser import RequestParser
from ..http.writer import reason_phrase, response_head
from .stream import Stream

__all__ = ["DownstreamConnection", "ListenerContext", "ServerState"]


@dataclass(slots=True)
class ServerState:
    """What the sidecar tracks across listeners: for limits and an orderly drain."""

    connections: set[DownstreamConnection] = field(default_factory=set)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
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
    serve: Callable[[Stream], Coroutine[Any, Any, None]]
    current_snapshot: Callable[[], object]
    on_protocol_error: Callable[[DownstreamConnection, DownstreamProtocolError], None]
    scheme: bytes = b"http"
    peer_identity: Callable[[asyncio.Transport], str | None] | None = None
    connections: int = 0


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
        self.parser = RequestParser(self, ctx.limits)
        self.client = "-"
        self.peer_identity: str | None = None
        self.streams: deque[Stream] = deque()
        self.closed = False
        self._blocked = 0
        self._write_paused = False
        self._timer: asyncio.TimerHandle | None = None
        self._head_timer_armed = False

    @property
    def draining(self) -> bool:
        return self.ctx.state.draining

    # === asyncio.Protocol ===============================================================
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        ctx = self.ctx
        ctx.state.connections.add(self)
        ctx.connections += 1
        peer = transport.get_extra_info("peername")
        self.client = peer[0] if peer else "-"
        transport.set_write_buffer_limits(high=64 * 1024)
        if ctx.peer_identity is not None:
            self.peer_identity = ctx.peer_identity(transport)
            if self.peer_identity is None:
                self.abort()  # not a valid workload identity: refused before any request
                return
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        streams = self.streams
        if streams and streams[0].tunnel and self.parser.upgraded:
            upstream = streams[0].upstream
            if upstream is not None:
                streams[0].exchange.bytes_in += len(data)
                upstream.write(data)
            return
        if self.parser.upgraded:
            # bytes after an upgrade request, before the upstream said 101: keep (bounded)
            if streams:
                streams[-1].early_data += data
                if len(streams[-1].early_data) > 64 * 1024:
                    self.block_reading(self.BLOCK_BODY)
            return
        if self._timer is not None and not self._head_timer_armed:
            self._cancel_timer()
        try:
            rest = self.parser.feed(data)
        except DownstreamProtocolError as exc:
            self._protocol_error(exc)
            return
        if self.parser.upgraded and streams:
            streams[-1].early_data = rest
        if self.parser.mid_head and not self._head_timer_armed:
            self._arm_head_timer()

    def eof_received(self) -> bool | None:
        # A half-closed client gets its in-flight responses; then we close.
        if not self.streams:
            self.close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timer()
        ctx = self.ctx
        ctx.state.connections.discard(self)
        ctx.connections -= 1
        for stream in self.streams:
            if stream.task is not None and not stream.task.done():
                stream.exchange.flags = "DC"  # downstream went away mid-exchange
                stream.task.cancel()
            elif stream.upstream is not None:
                stream.upstream.abort()
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
        self._cancel_timer()
        rid = head.header(b"x-request-id")
        if rid is not None and is_valid_request_id(rid):
            request_id = rid.decode("ascii")
        else:
            request_id = "%032x" % random.getrandbits(128)
            head.set_header(b"x-request-id", request_id.encode())
        exchange = Exchange(request=head, listener=self.ctx.name, downstream_address=self.client,
                            request_id=request_id, start=self.loop.time(),
                            peer_identity=self.peer_identity)
        stream = Stream(self, head, exchange, self.ctx.current_snapshot())
        self.streams.append(stream)
        if len(self.streams) == 1:
            self._start(stream)
        elif len(self.streams) > self.ctx.limits.max_pipelined:
            self.block_reading(self.BLOCK_PIPELINE)

    def on_body(self, chunk: bytes) -> None:
        self.streams[-1].feed_body(chunk)

    def on_request_end(self) -> None:
        self.streams[-1].end_body()

    # === exchanges ========================================================================
    def _start(self, stream: Stream) -> None:
        task = self.loop.create_task(self.ctx.serve(stream))
        stream.task = task
        tasks = self.ctx.state.tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def stream_done(self, stream: Stream) -> None:
        """The pipeline finished ``stream`` (called from its task)."""
        if not self.streams or self.streams[0] is not stream:
            return
        self.streams.popleft()
        if self.closed:
            return
        if not stream.keep_alive or not stream.response_done or self.draining:
            self.close()
            return
        self.unblock_reading(self.BLOCK_PIPELINE | self.BLOCK_BODY | self.BLOCK_UPSTREAM)
        if self.streams:
            self._start(self.streams[0])
        elif not (self.parser.mid_head):
            self._arm_idle()

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
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    # === closing ==========================================================================
    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self.closed = True

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
        self._cancel_timer()
        self._timer = self.loop.call_later(self.ctx.timeouts.idle, self.close)

    def _arm_head_timer(self) -> None:
        self._cancel_timer()
        self._head_timer_armed = True
        self._timer = self.loop.call_later(self.ctx.timeouts.request_headers, self._head_timeout)

    def _cancel_timer(self) -> None:
        self._head_timer_armed = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_timeout(self) -> None:
        self._timer = None
        self._head_timer_armed = False
        self._protocol_error(DownstreamProtocolError(
            f"request headers not received within {self.ctx.timeouts.request_headers}s",
            408, "request_timeout"))

    def _protocol_error(self, exc: DownstreamProtocolError) -> None:
        """Answer a malformed request (if nothing else is being answered) and close."""
        self.ctx.on_protocol_error(self, exc)
        busy = [s for s in self.streams if s.response_started and not s.response_done]
        if busy or (self.streams and self.streams[0].task is not None and not self.streams[0].body_done):
            self.abort()  # mid-exchange: the exchange cannot be answered cleanly any more
            return
        reply: LocalReply = exc.reply()
        body = reply.body(self.ctx.service)
        self.write(response_head(reply.status, reason_phrase(reply.status), [], [
            (b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
            (b"connection", b"close")]) + body)
        self.close()
