"""The downstream half of one exchange: the request body on its way up, the response on its
way down.

The request body is buffered only until an upstream connection is attached, then it passes
straight through; past ``HIGH_WATER`` buffered bytes the connection stops reading. A copy of
the body up to the route's ``max_replay_body`` is kept (references, not copies) so a failed
attempt can be re-sent; a longer body makes the exchange not replayable. The response is
re-framed for the downstream: Content-Length when upstream gave one, else chunked for
HTTP/1.1, else close-delimited.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Final, cast

from ..config.retries import MAX_REPLAY_BODY
from ..errors import LocalReply
from ..exchange import Exchange
from ..http.message import RequestHead, ResponseHead
from ..http.writer import LAST_CHUNK, chunk, header_line, local_reply, response_head

if TYPE_CHECKING:
    from ..errors import ProxyError
    from ..routing.routed import Tries
    from ..routing.router import Router
    from ..snapshot_slot import SnapshotView
    from ..upstream.upstream_connection import UpstreamConnection
    from .connection import DownstreamConnection

__all__ = ["Stream", "HIGH_WATER"]

HIGH_WATER: Final = 64 * 1024
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_MODE_NONE: Final = 0
_MODE_LENGTH: Final = 1
_MODE_CHUNKED: Final = 2
_MODE_CLOSE: Final = 3


class Stream:
    """One exchange on a downstream connection. The router drives it (``driver``) and keeps
    its own state of the exchange in ``tries`` (``routing.routed``)."""

    __slots__ = (
        "conn", "head", "exchange", "snapshot", "pending", "pending_bytes",
        "body_done", "replay", "replay_kept", "replay_bytes", "replay_limit", "upstream", "up_chunked",
        "response_started", "response_done", "mode", "keep_alive", "sent_continue",
        "tunnel", "early_data", "driver", "tries", "timeout", "finished",
        "collect_limit", "on_collected", "body_limit",
    )

    def __init__(self, conn: DownstreamConnection, head: RequestHead, exchange: Exchange,
                 snapshot: SnapshotView) -> None:
        self.conn = conn
        self.head = head
        self.exchange = exchange
        self.snapshot = snapshot
        # the body not yet sent, and a copy of it to send again (a retry), made at its first
        # piece: most requests have none, and two lists made and freed cost ~400 instructions.
        # Lists: compiled, deque() and its methods are calls by name
        self.pending: list[bytes] | None = None
        self.pending_bytes = 0
        self.body_done = not head.has_body
        self.replay: list[bytes] | None = None
        # False once the body passed replay_limit: the copy is dropped for good
        self.replay_kept = True
        self.replay_bytes = 0
        # until the route is known (``bound_replay``), the largest bound a route may set: the
        # body that comes before is held anyway (at most HIGH_WATER and a read), and the copy
        # shares its bytes
        self.replay_limit = MAX_REPLAY_BODY
        self.upstream: UpstreamConnection | None = None
        self.up_chunked = head.chunked
        self.response_started = False
        self.response_done = False
        self.mode = _MODE_NONE
        self.keep_alive = head.keep_alive
        self.sent_continue = False
        self.tunnel = False
        self.early_data = b""  # bytes after an upgrade request, for the tunnel
        # the router: it drives the exchange once routed, with its own state in ``tries``
        self.driver: Router | None = None
        self.tries: Tries | None = None
        self.timeout = 0.0  # the route timeout, running on conn.route_deadline
        self.finished = False
        self.body_limit = 0  # the service's max_request_body for a chunked body (0: none)
        # a filter that needs the whole body (validation) has it collected, bounded
        self.collect_limit = 0
        self.on_collected: Callable[[bool], None] | None = None

    # === request body =====================================================================
    def feed_body(self, data: bytes) -> None:
        ex = self.exchange
        ex.bytes_in += len(data)
        if self.body_limit and ex.bytes_in > self.body_limit:
            self.conn.body_over_limit(self, self.body_limit)
            return
        if self.replay_kept:
            self.replay_bytes += len(data)
            if self.replay_bytes > self.replay_limit:
                self.replay_kept = False
                self.replay = None
            elif self.replay is None:
                self.replay = [data]
            else:
                self.replay.append(data)
        upstream = self.upstream
        if upstream is not None:
            upstream.write(chunk(data) if self.up_chunked else data)
            return
        if self.pending is None:
            self.pending = [data]
        else:
            self.pending.append(data)
        self.pending_bytes += len(data)
        if self.collect_limit:
            if self.pending_bytes > self.collect_limit:
                self._collected(False)
        elif self.pending_bytes > HIGH_WATER:
            self.conn.block_reading(self.conn.BLOCK_BODY)

    def end_body(self) -> None:
        self.body_done = True
        if self.upstream is not None and self.up_chunked:
            self.upstream.write(LAST_CHUNK)
        if self.on_collected is not None:
            self._collected(True)

    def collect(self, limit: int, on_collected: Callable[[bool], None]) -> None:
        """Hold the whole body (at most ``limit`` bytes), then call ``on_collected(True)``;
        ``on_collected(False)`` as soon as it grows past the limit."""
        self.collect_limit = limit
        self.on_collected = on_collected
        if self.pending_bytes > limit:
            self._collected(False)
        elif self.body_done:
            self._collected(True)

    def _collected(self, ok: bool) -> None:
        callback = self.on_collected
        self.on_collected = None
        self.collect_limit = 0
        if callback is not None and not self.finished:
            callback(ok)

    def bound_replay(self, limit: int) -> None:
        """The route's ``max_replay_body``, once the route is known: a copy already past it is
        dropped, and the request is not sent again."""
        self.replay_limit = limit
        if self.replay_bytes > limit:
            self.replay_kept = False
            self.replay = None

    def replayable(self) -> bool:
        """Can the request be sent again in full? (its whole body is in the replay copy)"""
        return self.replay_kept and (self.body_done or self.replay_bytes == 0) \
            and not self.response_started

    def attach(self, upstream: UpstreamConnection, head_bytes: bytes, *, again: bool) -> None:
        """Send the request on ``upstream``: the head, what body we have, then live body."""
        self.upstream = upstream
        if not again and not self.sent_continue and self.head.expect_continue and not self.body_done:
            self.sent_continue = True
            self.conn.write(_CONTINUE)
        frame = self.up_chunked
        source = self.replay if again and self.replay_kept else self.pending
        if source is None and not (self.body_done and frame):
            upstream.write(head_bytes)  # the head alone: no list to join
        else:
            parts = [head_bytes]
            if source is not None:
                for data in source:
                    parts.append(chunk(data) if frame else data)
            if self.body_done and frame:
                parts.append(LAST_CHUNK)
            upstream.write(b"".join(parts) if len(parts) > 1 else head_bytes)
        self.pending = None
        self.pending_bytes = 0
        self.conn.unblock_reading(self.conn.BLOCK_BODY)

    def detach(self) -> None:
        self.upstream = None

    # === response (called by the UpstreamConnection) =======================================
    def cork(self) -> None:
        self.conn.cork()

    def uncork(self) -> None:
        self.conn.uncork()

    def on_response_head(self, head: ResponseHead) -> None:
        driver = self.driver
        if driver is not None and not driver.on_response_head(self, head):
            return  # a retriable failure: dropped, nothing of it goes downstream
        self.response_started = True
        self.exchange.status = head.status
        status = head.status
        extra: list[bytes] = []  # whole header lines (``header_line``)
        if status == 101:
            self.mode = _MODE_NONE
            extra.append(b"connection: upgrade\r\n")
            if head.upgrade is not None:
                extra.append(header_line(b"upgrade", head.upgrade))
            self.tunnel = True
            self.keep_alive = False
        elif self.head.method == "HEAD" or status == 204 or status == 304:  # (no body; compares, not a set's boxed look-up)
            self.mode = _MODE_NONE
            if head.content_length is not None and status != 204:
                extra.append(self.conn.response_length.line(head.content_length))
        elif head.content_length is not None:
            self.mode = _MODE_LENGTH
            extra.append(self.conn.response_length.line(head.content_length))
        elif self.head.version == "1.1":
            self.mode = _MODE_CHUNKED
            extra.append(b"transfer-encoding: chunked\r\n")
        else:
            self.mode = _MODE_CLOSE
            self.keep_alive = False
        if not self.body_done and not self.tunnel:
            # the upstream answered before the request body ended; we cannot resync the
            # downstream parser on the rest of a body nobody reads, so this is the last one
            self.keep_alive = False
        elif self.head.upgrade is not None:
            self.keep_alive = False  # the upgrade was declined; the parser cannot go on
        if status != 101:
            self._connection_header(extra)
        headers = head.pairs  # (after the block's lines, written as they are)
        if not head.has_request_id:
            pair = self.head.request_id_pair
            if pair is not None:  # the request's own pair, written as a header: no line made
                cast("list[tuple[bytes, ...]]", headers).append(pair)
            else:
                extra.append(self._request_id_line())
        if added := self.exchange.response_headers:  # a filter's (RateLimit-*): they win
            names = {name for name, _ in added}
            headers = [h for h in head.headers if h[0].lower() not in names]  # (the block's too)
            extra += [header_line(name, value) for name, value in added]
        self.conn.write(response_head(status, head.reason, headers, extra, head.block))
        if status == 101 and self.driver is not None:
            self.driver.on_tunnel_open(self)

    def _request_id_line(self) -> bytes:
        """The exchange's id for the client: the bytes forwarded upstream (the listener set
        ``head.request_id``), where an f-string of the text and its encode cost twice as much."""
        rid = self.head.request_id
        return b"x-request-id: %b\r\n" % (rid if rid is not None else self.exchange.request_id.encode())

    def _connection_header(self, extra: list[bytes]) -> None:
        keep = self.keep_alive and not self.conn.draining
        if not keep:
            self.keep_alive = False
            extra.append(b"connection: close\r\n")
        elif self.head.version == "1.0":
            extra.append(b"connection: keep-alive\r\n")

    def on_response_body(self, data: bytes) -> None:
        self.exchange.bytes_out += len(data)
        mode = self.mode
        if mode == _MODE_CHUNKED:
            self.conn.write(chunk(data))
        elif mode != _MODE_NONE:
            self.conn.write(data)

    def on_response_end(self) -> None:
        self.response_done = True
        if self.mode == _MODE_CHUNKED:
            self.conn.write(LAST_CHUNK)
        if self.driver is not None:
            self.driver.on_response_end(self)

    def on_upstream_error(self, exc: ProxyError) -> None:
        if self.driver is not None:
            self.driver.on_upstream_error(self, exc)

    def on_tunnel_data(self, data: bytes) -> None:
        self.exchange.bytes_out += len(data)
        self.conn.tunnel_write(data)

    def on_tunnel_closed(self) -> None:
        if self.driver is not None:
            self.driver.on_tunnel_closed(self)

    def pause_request_body(self) -> None:
        self.conn.block_reading(self.conn.BLOCK_UPSTREAM)

    def resume_request_body(self) -> None:
        self.conn.unblock_reading(self.conn.BLOCK_UPSTREAM)

    # === local replies ======================================================================
    def send_local_reply(self, reply: LocalReply, service: str) -> None:
        ex = self.exchange
        ex.flags = reply.flag
        ex.reason = reply.detail
        if self.response_started:
            # half a response is out (the log keeps the status the client already got): the
            # only honest signal left is to cut the connection
            self.keep_alive = False
            self.conn.abort()
            return
        ex.status = reply.status
        self.response_started = True
        self.response_done = True
        if reply.close or not self.body_done:
            self.keep_alive = False
        extra = [self._request_id_line(),
                 *[header_line(name, value) for name, value in ex.response_headers]]
        self._connection_header(extra)
        data, body_bytes = local_reply(reply, service, extra, head_only=self.head.method == "HEAD")
        ex.bytes_out += body_bytes
        self.conn.write(data)


