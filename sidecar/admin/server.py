"""The admin endpoint: a tiny HTTP/1.1 server of the sidecar's own (no web framework, so
the sidecar never imports aiohttp). It reuses the data plane's request parser and limits.

Reads are GET (and HEAD); mutations (``post_routes``: drain, shutdown) are POST-only in
Envoy's tradition, so a link, a prefetch or a probe can never trigger one (the wrong method
is a 405 naming the right one). It binds loopback only (the config loader refuses anything
else), and a mutation is also refused (403) from a peer that is not loopback, or that sends
an ``Origin`` header: a web page in a browser on the same host may POST to 127.0.0.1, curl
and the probes never send one.

Bounded and timed like any listener (a local process must not be able to pin the sidecar
through it): at most ``max_connections`` at once, past which a new connection is closed at
once and counted; a request must arrive whole (head and its small body) within
``request_headers`` of its first byte (408), a keep-alive connection closes after ``idle``;
a head past ``max_head`` is refused (431/414) and a body past ``max_body`` (413). A client
that does not read its responses is cut off rather than buffered for. A route that raises
answers 500 with a request id; the exception goes to the log, never to the client.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import structlog

from ..config.model import DownstreamTimeouts, Limits
from ..deadline import Deadline
from ..errors import DownstreamProtocolError
from ..http.headers import RequestIds, is_valid_request_id
from ..http.message import RequestHead
from ..http.request_parser import RequestParser
from ..http.writer import reason_phrase, response_head

__all__ = ["AdminLimits", "AdminServer", "AdminResponse", "json_response"]

log = structlog.get_logger("pake.admin")

AdminResponse = tuple[int, bytes, bytes]  # status, content type, body
Route = Callable[[], AdminResponse]

_LINGER_BYTES = 64 * 1024  # after an error reply, read and drop at most this much ...
_LINGER_SECONDS = 1.0      # ... for at most this long, so the reply is not lost to a reset


def json_response(status: int, data: Any) -> AdminResponse:
    return status, b"application/json", json.dumps(data, indent=2, default=str).encode() + b"\n"


@dataclass(frozen=True, slots=True)
class AdminLimits:
    """What one admin client may make the sidecar hold. Admin clients are probes, scrapers
    and an operator's curl: a few connections, short requests, no bodies."""

    max_connections: int = 64
    max_request_line: int = 4 * 1024  # -> 414
    max_head: int = 16 * 1024  # request line and headers together -> 431
    max_header_count: int = 64  # -> 431
    max_body: int = 1024  # -> 413; no route reads a body

    def parser_limits(self) -> Limits:
        return Limits(max_connections=self.max_connections, max_request_line=self.max_request_line,
                      max_headers_size=self.max_head - self.max_request_line,
                      max_header_count=self.max_header_count, max_request_body=self.max_body)


class _Refuse(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).abort()  # a reset: no FIN handshake to wait for


class _AdminConnection(asyncio.Protocol):
    def __init__(self, server: AdminServer, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.parser = RequestParser(self, server.parser_limits)
        self.transport: asyncio.Transport | None = None
        self.head: RequestHead | None = None
        # Timeouts: one deadline, for the request being read or for keep-alive idleness
        self._deadline = Deadline(loop, self._on_deadline)
        self._in_request = False  # a request has begun and not ended: the 408 timer runs
        self._write_paused = False
        self._lingering = False
        self._linger_left = _LINGER_BYTES
        self._counted = True  # in server.connections since the factory made it

    # === asyncio.Protocol ===============================================================
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream server's transport is a Transport; asyncio types it as the base class.
        transport = self.transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=64 * 1024)
        self._deadline.set_in(self.server.timeouts.idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self._deadline.cancel()
        if self._counted:
            self._counted = False
            self.server.connections -= 1
        self.transport = None

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            self._linger_left -= len(data)
            if self._linger_left < 0:
                self._abort()
            return
        if not self._in_request and data:
            # the first byte of a request: from now on the whole request must arrive in
            # request_headers, however slowly it trickles in (a slowloris gains nothing)
            self._in_request = True
            self._deadline.cancel()
            self._deadline.set_in(self.server.timeouts.request_headers)
        try:
            self.parser.feed(data)
        except DownstreamProtocolError as exc:
            self._fail(exc)
            return
        if not self._in_request and self.parser.mid_head and not self._lingering:
            self._in_request = True  # a pipelined request began in the same read
            self._deadline.cancel()
            self._deadline.set_in(self.server.timeouts.request_headers)

    def eof_received(self) -> bool | None:
        return None  # the client is done: close (answers in flight were already written)

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    # === RequestSink ====================================================================
    def on_request(self, head: RequestHead) -> None:
        self.head = head

    def on_body(self, chunk: bytes) -> None:
        pass  # admin takes no bodies; the parser bounds their size

    def on_request_end(self) -> None:
        head = self.head
        assert head is not None
        if self._lingering:
            return  # pipelined past a "connection: close" or an error: not answered
        if self._write_paused:
            # pipelined requests from a client that does not read its answers: stop here
            # rather than buffer answer after answer for it
            self._abort()
            return
        self._in_request = False
        response, extra = self._answer(head)
        status, ctype, body = response
        log.debug("admin_request", method=head.method, path=head.path, status=status)
        if head.method == "HEAD":
            body = b""
        close = not head.keep_alive
        self._send(status, ctype, body, close=close, extra=extra)
        if not close:
            self._deadline.cancel()
            self._deadline.set_in(self.server.timeouts.idle)

    # === answering ======================================================================
    def _answer(self, head: RequestHead) -> tuple[AdminResponse, list[tuple[bytes, bytes]]]:
        path = head.path
        routes, mutations = self.server.routes, self.server.post_routes
        route = routes.get(path)
        if route is None and path in mutations:
            if head.method != "POST":
                return json_response(405, {"error": "method_not_allowed",
                                           "detail": f"{path} changes the sidecar: use POST"}), \
                    [(b"allow", b"POST")]
            refused = self._refuse_mutation(head)
            if refused is not None:
                return json_response(403, {"error": "forbidden", "detail": refused}), []
            route = mutations[path]
        elif route is None:
            return json_response(404, {"error": "not_found", "detail": f"no admin path {path}",
                                       "paths": sorted(routes.keys() | mutations.keys())}), []
        elif head.method not in ("GET", "HEAD"):
            return json_response(405, {"error": "method_not_allowed",
                                       "detail": f"{path} is read-only: use GET"}), [(b"allow", b"GET, HEAD")]
        try:
            return route(), []
        except Exception:  # noqa: BLE001 - an admin bug must not kill the sidecar, nor leak
            rid = head.request_id
            request_id = rid.decode("ascii") if rid is not None and is_valid_request_id(rid) \
                else self.server.request_ids.take()
            log.exception("admin_route_failed", path=path, request_id=request_id)
            return json_response(500, {"error": "internal_error", "detail": "internal error",
                                       "request_id": request_id}), [(b"x-request-id", request_id.encode())]

    def _refuse_mutation(self, head: RequestHead) -> str | None:
        """Why a POST is refused, or None: only a local process (not a web page) may mutate."""
        peer = self.transport.get_extra_info("peername") if self.transport is not None else None
        if not _is_loopback_peer(peer):
            return "admin changes are accepted from loopback peers only"
        if head.header(b"origin") is not None:
            return "admin changes are not accepted from a web page (the request has an Origin header)"
        return None

    def _fail(self, exc: DownstreamProtocolError) -> None:
        """A request refused by the parser or the 408 timer: answer, then linger briefly so
        the client reads the answer instead of a reset, and close."""
        self._send(*json_response(exc.status, {"error": exc.error, "detail": exc.detail}), close=True)

    def _send(self, status: int, ctype: bytes, body: bytes, *, close: bool,
              extra: list[tuple[bytes, bytes]] | None = None) -> None:
        transport = self.transport
        if transport is None or transport.is_closing() or self._lingering:
            return
        headers = [(b"content-type", ctype), (b"content-length", b"%d" % len(body)),
                   (b"cache-control", b"no-store"), *(extra or ())]
        lines = [b"connection: close\r\n"] if close else []
        transport.write(response_head(status, reason_phrase(status), headers, lines) + body)
        if close:
            self._close_after_write()

    def _close_after_write(self) -> None:
        """Send FIN and keep reading (dropping) a bounded amount for a bounded time: closing
        with unread bytes would reset the connection and could destroy the reply."""
        transport = self.transport
        if transport is None:
            return
        self._lingering = True
        self._in_request = False
        try:
            transport.write_eof()
        except (NotImplementedError, OSError, RuntimeError):
            transport.close()
            return
        if self._write_paused:
            transport.resume_reading()  # read to drop, not to parse
        self._deadline.cancel()
        self._deadline.set_in(_LINGER_SECONDS)

    def _on_deadline(self) -> None:
        if self._lingering:
            self._abort()
        elif self._in_request:
            self._fail(DownstreamProtocolError(
                f"request not received within {self.server.timeouts.request_headers}s",
                408, "request_timeout"))
        else:
            self._close_idle()

    def _close_idle(self) -> None:
        transport = self.transport
        if transport is None:
            return
        if transport.get_write_buffer_size():
            self._abort()  # a client that stopped reading: nothing will flush
        else:
            transport.close()

    def _abort(self) -> None:
        self._deadline.cancel()
        if self.transport is not None:
            self.transport.abort()


def _is_loopback_peer(peer: object) -> bool:
    """A socket peer name (``(host, port, ...)``) on loopback; IPv4-mapped IPv6 included."""
    if not isinstance(peer, tuple) or not peer or not isinstance(peer[0], str):
        return False
    try:
        address = ipaddress.ip_address(peer[0].partition("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


class AdminServer:
    """The admin listener: ``routes`` answer GET and HEAD, ``post_routes`` POST from loopback.
    ``on_refused`` counts connections closed at once because ``limits.max_connections``
    were open (the sidecar passes its metric; by default a log line)."""

    def __init__(self, host: str, port: int, routes: dict[str, Route], *,
                 post_routes: dict[str, Route] | None = None,
                 limits: AdminLimits = AdminLimits(),
                 timeouts: DownstreamTimeouts = DownstreamTimeouts(),
                 on_refused: Callable[[], None] | None = None) -> None:
        self.host = host
        self.port = port
        self.routes = routes
        self.post_routes = post_routes or {}
        self.limits = limits
        self.parser_limits = limits.parser_limits()
        self.timeouts = timeouts
        self.connections = 0
        self.refused = 0
        self._on_refused = on_refused
        self.server: asyncio.Server | None = None
        self.request_ids = RequestIds()  # for a failed route's reply and log line

    def _protocol(self) -> asyncio.Protocol:
        if self.connections >= self.limits.max_connections:
            self.refused += 1
            if self._on_refused is not None:
                self._on_refused()
            else:
                log.warning("admin_connection_refused", open=self.connections,
                            max_connections=self.limits.max_connections)
            return _Refuse()
        # counted here, not in connection_made: several accepts in one loop round must not
        # all pass the check before any of them is counted
        self.connections += 1
        return _AdminConnection(self, asyncio.get_running_loop())

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._protocol, self.host, self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
