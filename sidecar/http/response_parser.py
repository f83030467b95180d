"""HTTP/1.1 responses from upstream: bytes in, calls on a ``ResponseSink`` out.

Hop-by-hop headers are removed here, so the downstream side re-frames the body itself.
A response to HEAD carries no body whatever its Content-Length says; llhttp cannot be
told that, so the parser ends the message at the head and the connection is not reused
(see ``UpstreamConnection``). 1xx responses other than 101 are dropped: the sidecar
answers ``Expect: 100-continue`` itself and never forwards Expect.
"""

from __future__ import annotations

from typing import Protocol

import httptools

from ..errors import UpstreamProtocolError
from .headers import HOP_BY_HOP, connection_tokens
from .message import ResponseHead

__all__ = ["ResponseParser", "ResponseSink"]

_MAX_HEAD = 96 * 1024
_HOP_LENGTHS = frozenset(len(name) for name in HOP_BY_HOP)
_MAX_HEADERS = 200
# RFC 9112 §4: reason-phrase = *( HTAB / SP / VCHAR / obs-text ). llhttp lets other control
# characters (NUL among them) through, and we forward the reason as received.


def _has_control(reason: bytes) -> bool:
    """A loop by index, as ``headers.is_valid_request_id`` (and why)."""
    for i in range(len(reason)):
        c = reason[i]
        if (c < 0x20 and c != 0x09) or c == 0x7F:
            return True
    return False


class ResponseSink(Protocol):
    def on_response_head(self, head: ResponseHead) -> None: ...
    def on_response_body(self, chunk: bytes) -> None: ...
    def on_response_end(self) -> None: ...


class ResponseParser:
    __slots__ = ("sink", "_parser", "_headers", "_head_bytes", "_in_head", "head_only",
                 "reason", "started", "done", "upgraded")

    def __init__(self, sink: ResponseSink) -> None:
        self.sink = sink
        self._parser = httptools.HttpResponseParser(self)
        self.upgraded = False
        self.begin(False)

    def begin(self, head_only: bool) -> None:
        """Expect the response to a new request (``head_only`` for HEAD)."""
        self.head_only = head_only
        self.started = False  # any byte of this response arrived
        self.done = False
        self._reset()

    def reusable(self) -> bool:
        """llhttp is ready for the next response on the same connection."""
        return self.done and not self.upgraded and not self.head_only

    def _reset(self) -> None:
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._in_head = True
        self.reason = b""

    def feed(self, data: bytes | memoryview) -> bytes:
        """Returns the bytes after a 101 response (the tunnel's first bytes), else b""."""
        self.started = True
        if self._in_head:
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.upgraded = True
            return bytes(data[exc.args[0]:])
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, UpstreamProtocolError):
                raise cause from None
            raise
        except httptools.HttpParserError as exc:
            raise UpstreamProtocolError(f"malformed upstream response: {exc}") from None
        if self._in_head and self._head_bytes > _MAX_HEAD:  # after parsing: body bytes don't count
            raise UpstreamProtocolError("upstream response head too large")
        return b""

    # --- httptools callbacks ------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.done:
            # A second response to one request, in the same read as the first: the upstream
            # is out of sync. It must neither reach the downstream nor be dropped silently
            # while the connection goes back to the pool (a later read there is refused).
            raise UpstreamProtocolError("upstream sent more than one response")
        self._reset()

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:
            self._headers.append((name, value))
            if len(self._headers) > _MAX_HEADERS:
                raise UpstreamProtocolError("too many upstream response headers")

    def on_headers_complete(self) -> None:
        self._in_head = False
        status = self._parser.get_status_code()
        if status < 100:
            # llhttp reads "099" as 99; forwarded as "99" it is not a status line (3 digits)
            raise UpstreamProtocolError(f"upstream status code {status} is not 100-999")
        if _has_control(self.reason):
            raise UpstreamProtocolError("control character in upstream reason phrase")
        if 100 <= status < 200 and status != 101:
            return
        content_length = None
        chunked = False
        connection: list[bytes] = []
        upgrade: bytes | None = None
        kept: list[tuple[bytes, bytes]] = []
        has_request_id = False
        for raw_name, value in self._headers:
            # names are forwarded as received; only possible hop-by-hop ones are lower-cased
            if len(raw_name) not in _HOP_LENGTHS:
                if len(raw_name) == 12 and raw_name.lower() == b"x-request-id":
                    has_request_id = True
                kept.append((raw_name, value))
                continue
            name = raw_name.lower()
            if name in HOP_BY_HOP:
                if name == b"upgrade":
                    upgrade = value
                elif name == b"content-length":
                    content_length = int(value)
                elif name == b"transfer-encoding":
                    if value.strip().lower() != b"chunked":  # we re-frame: another coding would be lost
                        raise UpstreamProtocolError("upstream Transfer-Encoding other than chunked")
                    chunked = True
                elif name == b"connection":
                    connection.append(value)
                continue
            kept.append((raw_name, value))
        if connection:
            tokens = connection_tokens(connection)
            kept = [(n, v) for n, v in kept if n.lower() not in tokens]
        head = ResponseHead(
            status=status, reason=self.reason or b"-", headers=kept,
            content_length=content_length, chunked=chunked,
            keep_alive=self._parser.should_keep_alive(),
            upgrade=upgrade if status == 101 else None, has_request_id=has_request_id,
        )
        self.sink.on_response_head(head)
        if self.head_only or status == 101:
            self.done = True
            self.sink.on_response_end()

    def on_body(self, body: bytes) -> None:
        if not self.done:
            self.sink.on_response_body(body)

    def on_message_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self._reset()  # an interim response; the final one follows
            return
        if not self.done:
            self.done = True
            self.sink.on_response_end()
