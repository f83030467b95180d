"""HTTP/1.1 responses from upstream: bytes in, calls on a ``ResponseSink`` out.

Hop-by-hop headers are removed here, so the downstream side re-frames the body itself.
A response to HEAD carries no body whatever its Content-Length says; llhttp cannot be
told that, so the parser ends the message at the head and the connection is not reused
(see ``UpstreamConnection``). 1xx responses other than 101 are dropped: the sidecar
answers ``Expect: 100-continue`` itself and never forwards Expect.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Protocol, cast

import httptools

from ..errors import UpstreamProtocolError
from .headers import HOP_BY_HOP, NameTable, connection_tokens, content_length_value
from .message import ResponseHead, block_without
from .wire import names, response_parser

if TYPE_CHECKING:
    from ..upstream.upstream_connection import UpstreamConnection

__all__ = ["ResponseParser", "ResponseSink"]

_MAX_HEAD: Final = 96 * 1024
_PLAIN: Final = 0
_REQUEST_ID: Final = 1
_HOP: Final = 2
_UPGRADE: Final = 3
_CONTENT_LENGTH: Final = 4
_TRANSFER_ENCODING: Final = 5
_CONNECTION: Final = 6
# What a response header is, by its name as servers commonly spell it (lower case or
# capitalised): one dict look-up a header instead of a ``lower()`` call for every name as
# long as a hop-by-hop one (compiled, a generic method call of ~700 instructions). A name
# not in the table is lowered only when its length is one of the table's special names'.
_SPECIAL_CODES: Final[dict[bytes, int]] = {
    **{name: _HOP for name in HOP_BY_HOP}, b"x-request-id": _REQUEST_ID, b"upgrade": _UPGRADE,
    b"content-length": _CONTENT_LENGTH, b"transfer-encoding": _TRANSFER_ENCODING,
    b"connection": _CONNECTION,
}
_COMMON_PLAIN: Final = (b"content-type", b"cache-control", b"date", b"server", b"vary", b"etag",
                        b"last-modified", b"location", b"set-cookie", b"content-encoding")
_RESPONSE_NAMES: Final[dict[bytes, int]] = {
    **{name: _PLAIN for name in _COMMON_PLAIN}, **{name.title(): _PLAIN for name in _COMMON_PLAIN},
    **_SPECIAL_CODES, **{name.title(): code for name, code in _SPECIAL_CODES.items()},
    b"X-Request-ID": _REQUEST_ID, b"TE": _HOP,
}
_RESPONSE_TABLE: Final = NameTable(_RESPONSE_NAMES)  # the same, looked up without hashing a name
_KNOWN_NAMES: Final = names(tuple(_RESPONSE_NAMES))  # the compiled form's parser gives these objects
# and writes the lines of all other names (in any case, without an underscore) as the block
_SPECIAL_NAMES: Final = names(tuple(_SPECIAL_CODES))
_SPECIAL_NAMES_SET: Final = frozenset(_SPECIAL_CODES)  # (never in the block)
_RESPONSE_BY_CODE: Final = tuple(_RESPONSE_NAMES.values())  # and says which (request_parser's _KNOWN_BY_CODE)
_LONGEST_SPECIAL: Final = max(len(name) for name in _SPECIAL_CODES)
# by a name's length, 1 when a special name is that long: most plain names (date, vary,
# cache-control, the x- ones) are not, and skip the look-up and its hash of a fresh object
# (~350 instructions a header, callgrind); indexing bytes is a compiled primitive
_SPECIAL_LENGTHS: Final = bytes(
    1 if any(len(name) == n for name in _SPECIAL_CODES) else 0 for n in range(_LONGEST_SPECIAL + 1))
_MAX_HEADERS: Final = 200
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
    __slots__ = ("_sink_head", "_sink_body", "_sink_end", "_feed", "_status_code", "_keep_alive",
                 "_headers", "_head_bytes", "_in_head", "head_only", "reason", "started", "done",
                 "upgraded", "_interim", "_conn")

    def __init__(self, sink: ResponseSink, *, conn: UpstreamConnection | None = None) -> None:
        self._conn = conn  # the sink, when it is an upstream connection (as the request parser's)
        # the sink's methods, bound once (as the request parser's)
        self._sink_head = sink.on_response_head
        self._sink_body = sink.on_response_body
        self._sink_end = sink.on_response_end
        parser = response_parser(self, _MAX_HEADERS, _KNOWN_NAMES, _SPECIAL_NAMES)
        self._feed = parser.feed_data  # and the parser's, called for every response
        # typed: the parser is ``Any`` (one of two classes), and compiled, an ``Any`` status was
        # compared by ``PyObject_RichCompare`` five times a response (~400 instructions, callgrind)
        self._status_code: Callable[[], int] = parser.get_status_code
        self._keep_alive: Callable[[], bool] = parser.should_keep_alive
        self.upgraded = False
        self.begin(False)

    def _head(self, head: ResponseHead) -> None:
        conn = self._conn
        if conn is not None:
            conn.on_response_head(head)
        else:
            self._sink_head(head)

    def _body(self, chunk: bytes) -> None:
        conn = self._conn
        if conn is not None:
            conn.on_response_body(chunk)
        else:
            self._sink_body(chunk)

    def _end(self) -> None:
        conn = self._conn
        if conn is not None:
            conn.on_response_end()
        else:
            self._sink_end()

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
        self._interim = False  # a 1xx other than 101: its end is not the response's
        self.reason = b""

    def feed(self, data: bytes | memoryview) -> bytes:
        """Returns the bytes after a 101 response (the tunnel's first bytes), else b""."""
        self.started = True
        if self._in_head:
            self._head_bytes += len(data)
        try:
            self._feed(data)
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
        # (``len``: compiled, a bytes object's truth is a generic call)
        if not self._in_head or self._headers or len(self.reason):
            self._reset()  # (``begin``, or an interim response's end, left it fresh: mostly)

    def on_status(self, reason: bytes) -> None:  # (httptools' parser only)
        # the reason mostly comes in one piece: taken as it is, where ``+=`` on the empty
        # bytes is a generic ``PyNumber_InPlaceAdd`` (~270 instructions, callgrind)
        self.reason = self.reason + reason if self.reason else reason

    def on_header(self, name: bytes, value: bytes) -> None:
        # (httptools' parser only: the compiled form's gathers the lines, see wire.py)
        if self._in_head:
            self._headers.append((name, value))
            if len(self._headers) > _MAX_HEADERS:
                raise UpstreamProtocolError("too many upstream response headers")

    def on_headers_complete(self, headers: list[tuple[bytes, bytes]] | None = None,
                            reason: bytes | None = None, codes: bytes = b"", block: bytes = b"",
                            block_lines: int = 0) -> None:
        if headers is not None:  # the head's lines, plain lines and reason, gathered by the compiled form's llhttp
            if len(headers) + block_lines > _MAX_HEADERS:  # (it keeps one more than the limit, no more)
                raise UpstreamProtocolError("too many upstream response headers")
            self._headers = headers
        if reason is not None:
            self.reason = reason
        self._in_head = False
        status = self._status_code()
        if status < 100:
            # llhttp reads "099" as 99; forwarded as "99" it is not a status line (3 digits)
            raise UpstreamProtocolError(f"upstream status code {status} is not 100-999")
        if _has_control(self.reason):
            raise UpstreamProtocolError("control character in upstream reason phrase")
        if 100 <= status < 200 and status != 101:
            self._interim = True
            return
        content_length = None
        chunked = False
        connection: list[bytes] | None = None  # made for a response that has the header
        upgrade: bytes | None = None
        kept: list[tuple[bytes, ...]] = []  # the pairs on_header made (see request_parser)
        has_request_id = False
        names = _RESPONSE_TABLE
        lengths = _SPECIAL_LENGTHS
        lines = cast("list[tuple[bytes, ...]]", self._headers)
        coded = len(codes) == len(lines)  # (httptools' parser: none)
        # the upstream's request id after the plain lines, as the compiled form's block puts
        # them first (request_parser's ``plain``): both forms forward one order
        ids = kept if coded else []
        for i in range(len(lines)):
            pair = lines[i]
            raw_name = pair[0]
            value = pair[1]
            # names are forwarded as received; only possible special ones are lower-cased
            n = len(raw_name)
            c = codes[i] if coded else 0
            if c:
                code = _RESPONSE_BY_CODE[c - 1]
            elif n > _LONGEST_SPECIAL or not lengths[n]:
                code = _PLAIN
            else:
                found = names.get(raw_name)
                if found is None:
                    found = names.get(raw_name.lower())
                code = _PLAIN if found is None else found
            if code == _PLAIN:
                kept.append(pair)
            elif code == _REQUEST_ID:
                has_request_id = True
                ids.append(pair)
            elif code == _CONTENT_LENGTH:
                content_length = content_length_value(value)
            elif code == _TRANSFER_ENCODING:
                if value.strip().lower() != b"chunked":  # we re-frame: another coding would be lost
                    raise UpstreamProtocolError("upstream Transfer-Encoding other than chunked")
                chunked = True
            elif code == _CONNECTION:
                if connection is None:
                    connection = []
                connection.append(value)
            elif code == _UPGRADE:
                upgrade = value
            # else: another hop-by-hop header, dropped
        if ids is not kept:
            kept += ids
        if connection is not None:
            tokens = connection_tokens(connection)
            kept = [pair for pair in kept if pair[0].lower() not in tokens]
            named = block_without(block, tokens, _SPECIAL_NAMES_SET, True) if len(block) else None
            if named is not None:
                kept = named + kept
                block = b""
        head = ResponseHead(
            status=status, reason=self.reason if len(self.reason) else b"-", headers=cast("list[tuple[bytes, bytes]]", kept),
            content_length=content_length, chunked=chunked,
            keep_alive=self._keep_alive(),
            upgrade=upgrade if status == 101 else None, has_request_id=has_request_id, block=block,
        )
        self._head(head)
        if self.head_only or status == 101:
            self.done = True
            self._end()

    def on_body(self, body: bytes) -> None:
        if not self.done:
            self._body(body)

    def on_message_complete(self) -> None:
        if self._interim:  # known from the head: no second call into the parser for the status
            self._reset()  # an interim response; the final one follows
            return
        if not self.done:
            self.done = True
            self._end()
