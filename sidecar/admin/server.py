"""The admin endpoint: a tiny HTTP/1.1 server of the sidecar's own (no web framework, so
the sidecar never imports aiohttp). It reuses the data plane's request parser and limits.

Only GET is served (and HEAD); mutations are POST-only in Envoy's tradition, and none are
offered yet. It binds loopback only: the config loader refuses anything else.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from ..config.model import Limits
from ..errors import DownstreamProtocolError
from ..http.message import RequestHead
from ..http.request_parser import RequestParser
from ..http.writer import reason_phrase, response_head

__all__ = ["AdminServer", "AdminResponse", "json_response"]

AdminResponse = tuple[int, bytes, bytes]  # status, content type, body
Route = Callable[[], AdminResponse]


def json_response(status: int, data: Any) -> AdminResponse:
    return status, b"application/json", json.dumps(data, indent=2, default=str).encode() + b"\n"


class _AdminConnection(asyncio.Protocol):
    def __init__(self, routes: dict[str, Route]) -> None:
        self.routes = routes
        self.parser = RequestParser(self, Limits(max_request_body=64 * 1024))
        self.transport: asyncio.Transport | None = None
        self.head: RequestHead | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed(data)
        except DownstreamProtocolError as exc:
            self._send(*json_response(exc.status, {"error": exc.error, "detail": exc.detail}), close=True)

    def on_request(self, head: RequestHead) -> None:
        self.head = head

    def on_body(self, chunk: bytes) -> None:
        pass  # admin takes no bodies; the parser bounds their size

    def on_request_end(self) -> None:
        head = self.head
        assert head is not None
        path = head.path
        route = self.routes.get(path)
        if route is None:
            response = json_response(404, {"error": "not_found", "detail": f"no admin path {path}",
                                           "paths": sorted(self.routes)})
        elif head.method not in ("GET", "HEAD"):
            response = json_response(405, {"error": "method_not_allowed",
                                           "detail": f"{path} is read-only: use GET"})
        else:
            try:
                response = route()
            except Exception as exc:  # noqa: BLE001 - an admin bug must not kill the sidecar
                response = json_response(500, {"error": "internal_error", "detail": repr(exc)})
        status, ctype, body = response
        if head.method == "HEAD":
            body = b""
        self._send(status, ctype, body, close=not head.keep_alive)

    def _send(self, status: int, ctype: bytes, body: bytes, *, close: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        extra = [(b"content-type", ctype), (b"content-length", b"%d" % len(body)),
                 (b"cache-control", b"no-store")]
        if close:
            extra.append((b"connection", b"close"))
        self.transport.write(response_head(status, reason_phrase(status), [], extra) + body)
        if close:
            self.transport.close()


class AdminServer:
    def __init__(self, host: str, port: int, routes: dict[str, Route]) -> None:
        self.host = host
        self.port = port
        self.routes = routes
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _AdminConnection(self.routes), self.host, self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
