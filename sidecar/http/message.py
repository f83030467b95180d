"""A parsed HTTP/1.1 request head, as the filters, the router and the upstream see it.

Header names are lower-case bytes, values are bytes as received, hop-by-hop headers are
already removed (the parser keeps what framing needs in fields), so what a filter reads is
exactly what will be re-serialised upstream. Pure: no asyncio imports.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["RequestHead", "ResponseHead"]


@dataclass(slots=True)
class RequestHead:
    method: str  # "GET"
    target: bytes  # origin-form target as forwarded: path and query
    path: str  # the path without the query, for routing and policy
    authority: str  # lower-case host[:port] (the absolute-form target's wins over Host)
    host: str  # authority without the port
    version: str  # "1.1" or "1.0"
    headers: list[tuple[bytes, bytes]]  # end-to-end headers, lower-case names, in order
    content_length: int | None = None
    chunked: bool = False
    keep_alive: bool = True
    upgrade: bytes | None = None  # the Upgrade header (e.g. b"websocket") when asked for
    expect_continue: bool = False
    forwarded_for: bytes | None = None  # X-Forwarded-For as received (kept out of headers)
    forwarded_proto: bytes | None = None  # X-Forwarded-Proto as received (also in headers)
    request_id: bytes | None = None  # X-Request-ID as received (also in headers)
    # W3C trace context as received (both also in headers), picked out by the parser's one
    # pass over the headers so that tracing reads no header list: b"" when sent twice
    traceparent: bytes | None = None
    tracestate: bool = False

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    def header(self, name: bytes) -> bytes | None:
        """The first value of ``name`` (lower-case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def header_values(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.headers if key == name]

    def remove_headers(self, *names: bytes) -> None:
        """Drop every header with one of ``names``: used to strip what outsiders may not set."""
        if any(key in names for key, _ in self.headers):
            self.headers = [(k, v) for k, v in self.headers if k not in names]


@dataclass(slots=True)
class ResponseHead:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    content_length: int | None = None
    chunked: bool = False
    keep_alive: bool = True
    upgrade: bytes | None = None  # the Upgrade header of a 101
    has_request_id: bool = False  # the upstream set x-request-id itself
