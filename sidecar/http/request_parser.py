"""HTTP/1.1 requests from downstream: bytes in, validated requests out.

llhttp (through httptools) already refuses most ambiguous framing: Content-Length with
Transfer-Encoding, differing or duplicate Content-Length, bad chunk lines, obs-fold, bare
CR or LF, whitespace before the colon, invalid names, CR/LF/NUL in values. This module adds
what it does not: size limits (414/431/413), Transfer-Encoding other than exactly
``chunked``, chunk extensions past a bound, HTTP versions other than 1.0/1.1, underscores
in names, the Host rules, CONNECT. Every refusal raises ``DownstreamProtocolError`` with
the status to send; the connection is then closed and nothing is forwarded.

No asyncio here: the connection feeds bytes and receives calls on a ``RequestSink``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

import httptools

from ..config.model import Limits
from ..errors import DownstreamProtocolError
from .headers import REQUEST_SPECIAL, NameTable, connection_tokens, content_length_value
from .message import COMMON_METHODS, RequestHead, block_without
from .wire import GATHERS_HEADERS, HEAD_ENDS, names, request_parser

if TYPE_CHECKING:
    from ..listener.connection import DownstreamConnection

__all__ = ["RequestParser", "RequestSink"]

# Final, so that the compiled form compares with constants: names bound by unpacking
# ``range(12)`` were read from the module's dict at each comparison (34 look-ups, ~4.7k
# instructions a realistic head, callgrind).
_HOST: Final = 0
_REQUEST_ID: Final = 1
_FORWARDED_FOR: Final = 2
_FORWARDED_PROTO: Final = 3
_CONTENT_LENGTH: Final = 4
_TRANSFER_ENCODING: Final = 5
_CONNECTION: Final = 6
_UPGRADE: Final = 7
_EXPECT: Final = 8
_DROP: Final = 9
_TRACEPARENT: Final = 10
_TRACESTATE: Final = 11
_PLAIN: Final = -1  # an end-to-end header: forwarded as it is
# One dict look-up per header decides everything that is not a plain end-to-end header:
# exactly the names of ``REQUEST_SPECIAL``, the rest of them (hop-by-hop, mesh-internal) dropped
_SPECIAL: Final[dict[bytes, int]] = {
    **{name: _DROP for name in REQUEST_SPECIAL},
    b"host": _HOST, b"x-request-id": _REQUEST_ID, b"x-forwarded-for": _FORWARDED_FOR,
    b"x-forwarded-proto": _FORWARDED_PROTO, b"content-length": _CONTENT_LENGTH,
    b"transfer-encoding": _TRANSFER_ENCODING, b"connection": _CONNECTION, b"upgrade": _UPGRADE,
    b"expect": _EXPECT, b"traceparent": _TRACEPARENT, b"tracestate": _TRACESTATE,
}
# Header names as clients commonly spell them (lower case, or capitalised as curl, Go and
# browsers do), mapped to one lower-case object and its ``_SPECIAL`` code: one dict look-up
# instead of a ``lower()`` call and a second look-up of a fresh object to hash (compiled,
# ~250 instructions less a header, and the second look-up ~100 more). Fixed at import; any
# other spelling is lowered and looked up in ``_SPECIAL`` as before. None of them has an
# underscore, so only names outside the table are searched for one.
_COMMON_NAMES: Final = (
    *_SPECIAL, b"accept", b"accept-encoding", b"accept-language", b"authorization", b"baggage",
    b"cache-control", b"content-type", b"cookie", b"if-none-match", b"if-modified-since",
    b"origin", b"pragma", b"referer", b"user-agent", b"x-api-key", b"x-real-ip",
)
# (the lower-case name, its code, whether the spelling is already the lower-case name)
_KNOWN: Final[dict[bytes, tuple[bytes, int, bool]]] = {
    spelling: (name, _SPECIAL.get(name, _PLAIN), spelling == name)
    for name in _COMMON_NAMES for spelling in (name, name.title())
}
_KNOWN_TABLE: Final = NameTable(_KNOWN)  # the same, looked up without hashing a name
_KNOWN_NAMES: Final = names(tuple(_KNOWN))  # the compiled form's parser gives these objects
# and writes the lines of all other names (in any case, without an underscore) as the block
_SPECIAL_NAMES: Final = names(tuple(_SPECIAL))
# and says which of them a line's name is, its place plus one (``on_headers_complete``'s codes):
# its entry by index, not by ``NameTable.get`` (~90 instructions a line, callgrind)
_KNOWN_BY_CODE: Final = tuple(_KNOWN.values())
# the methods requests name most, as the one str object each: the bytes llhttp gives are
# looked up rather than decoded, and the str's hash is kept for the look-ups after
# (``writer.request_head``, the method checks of routes and policies)
_METHODS: Final = {method.encode(): method for method in COMMON_METHODS}
_NO_HOST: Final = b"\x00"  # never a Host that passes ``_check_host``
_MAX_CHUNK_OVERHEAD: Final = 4096  # bytes of chunk-size line + extensions allowed per chunk
_HOST_CHARS: Final = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-._~:[]!$&'()*+;=%")


class RequestSink(Protocol):
    def on_request(self, head: RequestHead) -> None: ...
    def on_body(self, chunk: bytes) -> None: ...
    def on_request_end(self) -> None: ...


class RequestParser:
    __slots__ = (
        "_sink_request", "_sink_body", "_sink_end", "_feed", "_keep_alive", "_method",
        "_limits", "_parser", "_url", "_headers", "_codes", "_in_head", "_head_bytes",
        "_chunked", "_chunks", "_overhead", "_body_bytes", "_max_body", "_max_head", "upgraded",
        "_body_total", "_head_rest", "_head_done_here", "_fed_now", "_account", "_held",
        "_length", "_host", "_authority", "_hostname", "_conn", "_raw_method", "_method_text",
    )

    def __init__(self, sink: RequestSink, limits: Limits, *,
                 conn: DownstreamConnection | None = None) -> None:
        # ``conn``: the sink, when it is a listener's connection (the admin server's and the
        # tests' sinks are not). Compiled, its methods are native calls, where a bound
        # method is called through its wrapper (~110 instructions a call, callgrind).
        self._conn = conn
        # the sink's methods, bound once: compiled, a call through the ``RequestSink`` protocol
        # looks the method up by name each time (~100 instructions of ~200)
        self._sink_request = sink.on_request
        self._sink_body = sink.on_body
        self._sink_end = sink.on_request_end
        self._limits = limits
        parser = self._parser = request_parser(self, limits.max_header_count, _KNOWN_NAMES,
                                               limits.max_request_line, _SPECIAL_NAMES)
        # and the parser's, for the same reason: called for every request
        self._feed = parser.feed_data
        self._keep_alive: Callable[[], bool] = parser.should_keep_alive  # (typed: see ResponseParser)
        self._method: Callable[[], bytes] = parser.get_method
        self._max_body = limits.max_request_body
        self._max_head = limits.max_request_line + limits.max_headers_size
        self.upgraded = False
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._codes = b""  # the compiled form's: which of ``_KNOWN`` each line's name is
        self._in_head = True
        self._head_bytes = 0
        self._chunked = False
        self._chunks = 0
        self._overhead = 0
        self._body_bytes = 0
        self._length = 0  # the Content-Length of the body being read (not chunked)
        # The last Host header and what it checked out as: a keep-alive client names the same
        # host on every request, and a bytes compare is cheaper than the checks (~1.7k
        # instructions a request, callgrind). Starts as a value no Host can equal.
        self._host = _NO_HOST
        self._authority = ""
        self._hostname = ""
        # The last method's bytes and its text: the wire's parser gives one bytes object a
        # method, so a connection's next GET is known by identity, where the look-up of a
        # bytes object that is not the key compares them (~300 instructions, callgrind).
        self._raw_method = b""
        self._method_text = ""
        self._body_total = 0  # body bytes of all messages: never reset, for per-read deltas
        self._head_rest = 0  # estimated head bytes in the read where the head completed
        self._head_done_here = False
        self._fed_now = 0  # length of the read being parsed
        self._account = False  # a chunked body was being read during this read
        # What a read of a chunked body parsed is held until the whole read passed its checks
        # (an over-long chunk extension is only seen at the end of the read), then handed on
        # in order: nothing of a read that breaks the rules is forwarded. Each item says what
        # it is by its type: a head, a body chunk, or None for a request's end.
        self._held: list[RequestHead | bytes | None] | None = None

    @property
    def mid_head(self) -> bool:
        """Part of a request head has arrived, not all of it (the 408 timer runs)."""
        return self._in_head and self._head_bytes > 0

    def head_room(self, buf: bytes, pos: int, end: int, heads: int) -> int:
        """How far into ``buf[pos:end]`` the parser may be fed so that at most ``heads``
        request heads complete (``heads`` >= 1): the connection bounds pipelining where the
        bytes arrive, not one read later. Never too far: llhttp (strict) ends a head only
        at a CRLF CRLF, so a head can complete only where ``\n\r\n`` ends, and none inside
        what remains of a Content-Length body. ``pos == 0`` is taken to follow bytes of an
        earlier read, so a terminator split across reads is counted too. The cost is a
        ``find`` or two (a memchr), not a parse; a chunked body's blank lines only make the
        step shorter."""
        if not self._in_head and not self._chunked:
            pos += self._length - self._body_bytes
            if pos >= end:
                return end
        elif pos == 0 and end and (buf[0] == 10 or buf[0] == 13 and end > 1 and buf[1] == 10):
            # "\n\r" or "\n" may have ended an earlier read: a head may complete right here
            heads -= 1
            if heads == 0:
                return 1 if buf[0] == 10 else 2
        at = pos - 2 if pos >= 2 else 0
        return _HEAD_ENDS(buf, at, end, heads)

    def feed(self, data: bytes | bytearray | memoryview) -> bytes:
        """Parse ``data``. Returns bytes that follow an upgrade request (to tunnel), else b""."""
        n = len(data)  # once: of a bytes-or-view, a generic call compiled
        if self._in_head:
            self._head_bytes += n
        body_before = self._body_total
        self._head_done_here = False
        self._fed_now = n
        self._account = self._chunked
        try:
            self._feed(data)
        except httptools.HttpParserUpgrade as exc:
            self.upgraded = True
            self._release_held()
            return bytes(data[exc.args[0]:])
        except httptools.HttpParserCallbackError as exc:
            self._held = None
            cause = exc.__context__
            if isinstance(cause, DownstreamProtocolError):
                raise cause from None
            raise
        except httptools.HttpParserError as exc:
            self._held = None
            raise DownstreamProtocolError(f"malformed request: {exc}") from None
        if self._in_head and self._head_bytes > self._max_head:
            # httptools holds a partial header in memory until it is complete: cap it here
            if not (self._parser.head_lines() if GATHERS_HEADERS else self._headers):
                raise DownstreamProtocolError("request line too long", 414, "uri_too_long")
            raise DownstreamProtocolError("request headers too large", 431, "headers_too_large")
        if self._account:
            try:
                self._account_chunk_overhead(n, self._body_total - body_before)
            except DownstreamProtocolError:
                self._held = None
                raise
        if self._held is not None:
            self._release_held()
        return b""

    def _request(self, head: RequestHead) -> None:
        conn = self._conn
        if conn is not None:
            conn.on_request(head)
        else:
            self._sink_request(head)

    def _body(self, chunk: bytes) -> None:
        conn = self._conn
        if conn is not None:
            conn.on_body(chunk)
        else:
            self._sink_body(chunk)

    def _end(self) -> None:
        conn = self._conn
        if conn is not None:
            conn.on_request_end()
        else:
            self._sink_end()

    def _release_held(self) -> None:
        held, self._held = self._held, None
        if held:
            for item in held:
                if item is None:
                    self._end()
                elif isinstance(item, bytes):
                    self._body(item)
                else:
                    self._request(item)

    def _account_chunk_overhead(self, fed: int, body: int) -> None:
        """Bytes of a chunked body that are not data: size lines, extensions, CRLFs. llhttp
        consumes extensions without telling us, so they are counted here: what a read brought
        minus the body it delivered (minus the head, when the head ended in the same read).
        The head is estimated from its parsed fields, which can only make the overhead look
        larger, never let a long extension through."""
        used = fed - body - (self._head_rest if self._head_done_here else 0)
        self._overhead += max(used, 0)
        if self._overhead > _MAX_CHUNK_OVERHEAD + 32 * self._chunks:
            raise DownstreamProtocolError("chunk extensions too long")

    # --- httptools callbacks ------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._account and not self._chunked:
            # a chunked request ended earlier in this read and another begins: how much of
            # the read is whose is unknown, so this read is not accounted (it is bounded by
            # the read size, and llhttp streams extensions through without holding them)
            self._account = False
        self._url = b""
        if not GATHERS_HEADERS:  # (else the head's list comes with on_headers_complete)
            self._headers = []
        self._body_bytes = 0

    def on_url(self, url: bytes) -> None:
        # (the compiled form's llhttp calls it only with a target past the limit)
        # as ``ResponseParser.on_status``: the first piece is taken as it is
        self._url = self._url + url if self._url else url
        if len(self._url) > self._limits.max_request_line:
            raise DownstreamProtocolError("request line too long", 414, "uri_too_long")

    def on_header(self, name: bytes, value: bytes) -> None:
        # (httptools' parser only: the compiled form's gathers the lines, see wire.py)
        if self._in_head:  # after the head: trailers, which are not forwarded
            # llhttp keeps trailing OWS (RFC 9110 §5.5); looked at before calling rstrip, which
            # few values need (a method call on each header costs more than the index)
            # (``len(value)``, not ``value``: compiled, a bytes object's truth is a generic call)
            if len(value) and (value[-1] == 32 or value[-1] == 9):
                value = value.rstrip(b" \t")
            self._headers.append((name, value))

    def on_headers_complete(self, headers: list[tuple[bytes, bytes]] | None = None,
                            url: bytes | None = None, codes: bytes = b"", block: bytes = b"",
                            block_lines: int = 0) -> None:
        # the compiled form's llhttp gathers the head's lines, their names' codes, its plain
        # lines and its target (which it gave to ``on_url`` instead only when past the
        # request line's limit: refused there)
        if headers is not None:
            self._headers = headers
        self._codes = codes
        if url is not None:
            self._url = url
        head = self._build_head(block, block_lines)
        self._in_head = False
        self._chunked = head.chunked
        self._length = head.content_length or 0
        if head.chunked:
            self._chunks = 0
            self._overhead = 0
            self._head_done_here = True
            self._account = True
            estimate = len(head.method) + len(self._url) + 12 + sum(
                len(n) + len(v) + 4 for n, v in self._headers) + len(block) + 2
            earlier = self._head_bytes - self._fed_now  # of this head, in earlier reads
            self._head_rest = max(estimate - max(earlier, 0), 0)
        limit = self._max_body
        if limit is not None and head.content_length is not None and head.content_length > limit:
            raise DownstreamProtocolError(
                f"request body of {head.content_length} bytes exceeds the limit of {limit}",
                413, "payload_too_large")
        if self._held is not None:
            self._held.append(head)  # behind a held chunked request of this read
        else:
            self._request(head)

    def on_chunk_header(self) -> None:
        self._chunks += 1

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        self._body_total += len(body)
        limit = self._max_body
        if limit is not None and self._body_bytes > limit:
            raise DownstreamProtocolError(
                f"request body exceeds the limit of {limit} bytes", 413, "payload_too_large")
        if self._chunked:
            if self._held is None:
                self._held = []
            self._held.append(body)
        else:
            self._body(body)

    def on_message_complete(self) -> None:
        self._chunked = False  # (a chunked body that ended in this read is still accounted)
        self._in_head = True
        self._head_bytes = 0
        if self._held is not None:
            self._held.append(None)
        else:
            self._end()

    # --- validation -----------------------------------------------------------------------
    def _build_head(self, block: bytes, block_lines: int) -> RequestHead:
        """The head of the lines gathered: ``block``, the compiled form's plain lines
        (``block_lines`` of them, b"" and 0 from httptools' parser), then ``_headers``."""
        parser = self._parser
        limits = self._limits
        headers = self._headers
        count = len(headers) + block_lines
        if count > limits.max_header_count:
            raise DownstreamProtocolError(
                f"{count} request headers, more than {limits.max_header_count}", 431,
                "headers_too_large")
        if self._head_bytes > limits.max_headers_size and \
                sum(len(n) + len(v) + 4 for n, v in headers) + len(block) > limits.max_headers_size:
            raise DownstreamProtocolError("request headers too large", 431, "headers_too_large")
        # llhttp keeps an HTTP/1.1 request alive unless it says ``Connection: close``, and any
        # other version only with a ``Connection: keep-alive`` (RFC 9112 §9.3). So a request
        # kept alive with no Connection header is 1.1, and ``get_http_version`` (a string
        # format, ~2.2k instructions) runs only for the others: here, or after the headers.
        keep_alive = self._keep_alive()
        version = "1.1" if keep_alive else _version(parser)
        raw_method = self._method()
        if raw_method is self._raw_method:
            method = self._method_text
        else:
            found = _METHODS.get(raw_method)
            method = found if found is not None else raw_method.decode("ascii")
            self._raw_method = raw_method
            self._method_text = method
        if method == "CONNECT":
            raise DownstreamProtocolError("CONNECT is not supported", 405, "method_not_allowed")

        host: bytes | None = None
        hosts = 0
        content_length: int | None = None
        chunked = False
        connection: list[bytes] | None = None
        upgrade: bytes | None = None
        expect = False
        forwarded_for: bytes | None = None
        forwarded_proto: bytes | None = None
        request_id: bytes | None = None
        request_id_pair: tuple[bytes, ...] | None = None
        traceparent: bytes | None = None
        tracestate = False
        # ``kept.append``, not a bound ``keep = kept.append``: compiled, the method is a direct
        # list append; the bound one is a generic call (~200 instructions each).
        # ``tuple[bytes, ...]``, not ``tuple[bytes, bytes]``: compiled, a fixed-length tuple is
        # unpacked into a C struct and boxed again into a new tuple when stored, and a header
        # whose name is already lower case is forwarded as the pair llhttp's callback made.
        kept: list[tuple[bytes, ...]] = []
        underscores_ok = limits.allow_underscores_in_headers
        known = _KNOWN_TABLE
        lines = cast("list[tuple[bytes, ...]]", headers)
        codes = self._codes
        coded = len(codes) == len(lines)  # (httptools' parser: none)
        # httptools' parser gives every line as a pair: its plain ones are put first, as the
        # compiled form's block is, so that both forms forward a head in one order
        plain = kept if coded else []
        for i in range(len(lines)):
            pair = lines[i]
            raw_name = pair[0]
            value = pair[1]
            c = codes[i] if coded else 0
            # (unpacked where it is read: a known entry put in ``entry``, an Optional, was a
            # new tuple each line once compiled)
            entry = None if c else known.get(raw_name)
            if c:
                name, code, as_received = _KNOWN_BY_CODE[c - 1]
            elif entry is None:
                name = raw_name.lower()
                as_received = name == raw_name
                # Only here: no name in ``_KNOWN`` has an underscore. The int of "_", not
                # ``b"_" in name`` (bytes.__contains__ first tries its operand as an int, and
                # raises and clears a TypeError: ~1.8k instructions a header, callgrind) nor
                # ``find`` (a method call by name once compiled, ~1k): a memchr.
                if not underscores_ok and 95 in name:
                    raise DownstreamProtocolError(
                        f"header name with underscore refused: {name.decode('latin-1')}")
                code = _SPECIAL.get(name, _PLAIN)
            else:
                name, code, as_received = entry
            if code == _PLAIN:
                plain.append(pair if as_received else (name, value))
            elif code == _HOST:
                host = value
                hosts += 1
            elif code == _REQUEST_ID:
                request_id = value
                request_id_pair = pair if as_received else (name, value)
                kept.append(request_id_pair)
            elif code == _FORWARDED_FOR:
                forwarded_for = value if forwarded_for is None else forwarded_for + b", " + value
            elif code == _FORWARDED_PROTO:
                forwarded_proto = value
                kept.append(pair if as_received else (name, value))
            elif code == _CONTENT_LENGTH:
                content_length = content_length_value(value)  # llhttp checked the digits and duplicates
            elif code == _TRANSFER_ENCODING:
                if value.strip().lower() != b"chunked":
                    raise DownstreamProtocolError(
                        "Transfer-Encoding other than a single chunked is refused")
                chunked = True
            elif code == _CONNECTION:
                if connection is None:
                    connection = []
                connection.append(value)
            elif code == _UPGRADE:
                upgrade = value
            elif code == _EXPECT:
                if value.strip().lower() != b"100-continue":
                    raise DownstreamProtocolError("unsupported Expect", 417, "expectation_failed")
                expect = True
            elif code == _TRACEPARENT:  # kept: forwarded as is when tracing is off
                traceparent = value if traceparent is None else b""  # two: neither is believed
                kept.append(pair if as_received else (name, value))
            elif code == _TRACESTATE:
                tracestate = True
                kept.append(pair if as_received else (name, value))
            # else: hop-by-hop or mesh-internal: dropped

        if plain is not kept:
            kept = plain + kept
        if connection is not None:
            if keep_alive:  # perhaps an HTTP/1.0 (or 2.0) request with Connection: keep-alive
                version = _version(parser)
            tokens = connection_tokens(connection)
            # headers the client named in Connection are hop-by-hop too
            kept = [pair for pair in kept if pair[0] not in tokens]
            named = block_without(block, tokens, REQUEST_SPECIAL, False) if len(block) else None
            if named is not None:
                kept = named + kept
                block = b""
            if upgrade is not None and b"upgrade" not in tokens:
                upgrade = None
        else:
            upgrade = None
        if chunked and version == "1.0":  # HTTP/1.0 has no chunked coding (RFC 9112 §6.1)
            raise DownstreamProtocolError("Transfer-Encoding in an HTTP/1.0 request")

        target, authority = self._target(method)
        if hosts > 1:  # RFC 9112 §3.2: a 400 whatever the target's form
            raise DownstreamProtocolError("more than one Host header")
        if authority is None:
            if host is None:
                if version == "1.1":
                    raise DownstreamProtocolError("HTTP/1.1 request without Host")
                authority = hostname = ""
            elif host == self._host:
                authority, hostname = self._authority, self._hostname
            else:
                authority = self._authority = _check_host(host)
                hostname = self._hostname = _strip_port(authority)
                self._host = host
        else:
            if host is not None:
                _check_host(host)  # an invalid Host is refused even where the target's authority wins
            hostname = _strip_port(authority)
        # ``in`` with the int of "?" is a memchr; ``find`` is a method call by name once
        # compiled (~950 instructions, callgrind), left for a target with a query
        path = (target[:target.find(b"?")] if 63 in target else target).decode("latin-1")
        return RequestHead(
            method, target, path, authority, hostname, version, cast("list[tuple[bytes, bytes]]", kept),
            content_length, chunked, keep_alive, upgrade, expect,
            forwarded_for, forwarded_proto, request_id, traceparent, tracestate, request_id_pair,
            block,
        )

    def _target(self, method: str) -> tuple[bytes, str | None]:
        """The origin-form target and, for an absolute-form one, its authority (which wins
        over Host, RFC 9112 §3.2.2)."""
        url = self._url
        if url[:1] == b"/":
            return url, None
        if url == b"*":
            if method != "OPTIONS":
                raise DownstreamProtocolError("asterisk target only with OPTIONS")
            return url, None
        lower = url[:8].lower()
        if lower.startswith(b"http://") or lower.startswith(b"https://"):
            rest = url.split(b"://", 1)[1]
            slash = rest.find(b"/")
            query = rest.find(b"?")
            cut = min(i for i in (slash, query, len(rest)) if i >= 0)
            authority = rest[:cut]
            if b"@" in authority:
                raise DownstreamProtocolError("userinfo in request target")
            target = rest[cut:] or b"/"
            if target[:1] == b"?":
                target = b"/" + target
            return target, _check_host(authority)
        raise DownstreamProtocolError("malformed request target")


def head_ends(buf: bytes, at: int, end: int, heads: int) -> int:
    """Where in ``buf[:end]`` the ``heads``-th ``\n\r\n`` from ``at`` ends, or ``end`` when
    fewer are there: ``head_room``'s scan, as Python (``wire.HEAD_ENDS`` is the same in C)."""
    # Most reads hold fewer heads than there is room for, and a count of the newlines says
    # so: every head that can end here ends with its own "\n\r\n" (two head ends are at
    # least a request line apart), so fewer than two newlines a head means fewer heads.
    # One count of a byte, where a count of "\n\r\n" took twice as long (574 vs 321 ns
    # for a realistic 754-byte head; the byte count runs more instructions, ~4.6k vs
    # ~2.5k, in a loop without branches to mispredict) and a find per head costs a call.
    if buf.count(b"\n", at, end) < 2 * heads:
        return end
    while True:
        at = buf.find(b"\n\r\n", at, end)
        if at < 0:
            return end
        heads -= 1
        if heads == 0:
            return at + 3
        at += 1


# the compiled form's C scan (a memchr a line: ~0.5k instructions, not ~5k), else the above
_HEAD_ENDS: Final[Callable[[bytes, int, int, int], int]] = HEAD_ENDS if HEAD_ENDS is not None else head_ends


def _version(parser: Any) -> str:
    version: str = parser.get_http_version()
    if version != "1.1" and version != "1.0":
        raise DownstreamProtocolError(f"HTTP version {version} is not supported", 505,
                                      "http_version_not_supported")
    return version


@functools.lru_cache(maxsize=256)  # a pure function; a sidecar sees few distinct hosts
def _check_host(value: bytes) -> str:
    host = value.strip().lower()
    if not host or b"," in host or not _HOST_CHARS.issuperset(host):
        raise DownstreamProtocolError("invalid Host")
    return host.decode("ascii")


def _strip_port(authority: str) -> str:
    if authority.startswith("["):
        return authority.partition("]")[0] + "]"
    return authority.partition(":")[0]
