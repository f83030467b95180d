"""Headers only the mesh may set are dropped by the request parser itself, in its single
pass over the headers; the policy filters rely on that for the reserved ones."""

from __future__ import annotations

from sidecar.config.model import Limits
from sidecar.http.headers import MESH_INTERNAL, RESERVED_HEADERS
from sidecar.http.message import RequestHead
from sidecar.http.request_parser import RequestParser


class _Sink:
    head: RequestHead

    def on_request(self, head: RequestHead) -> None:
        self.head = head

    def on_body(self, chunk: bytes) -> None: ...
    def on_request_end(self) -> None: ...


def test_every_reserved_header_is_dropped_by_the_parser() -> None:
    assert {h.encode() for h in RESERVED_HEADERS} <= MESH_INTERNAL
    sink = _Sink()
    spoofed = b"".join(b"%s: spoofed\r\n" % name.title() for name in sorted(MESH_INTERNAL))
    RequestParser(sink, Limits()).feed(b"GET / HTTP/1.1\r\nHost: a\r\n" + spoofed + b"X-Kept: 1\r\n\r\n")
    assert sink.head.headers == [(b"x-kept", b"1")]
