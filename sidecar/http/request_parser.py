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

from typing import Protocol

import httptools

from ..config.model import Limits
from ..errors import DownstreamProtocolError
from .headers import HOP_BY_HOP, connection_tokens
from .message import RequestHead

__all__ = ["RequestParser", "RequestSink"]

_MAX_CHUNK_OVERHEAD = 4096  # bytes of chunk-size line + extensions allowed per chunk
_HOST_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-._~:[]!$&'()*+;=%")


class RequestSink(Protocol):
    def on_request(self, head: RequestHead) -> None: ...
    def on_body(self, chunk: bytes) -> None: ...
    def on_request_end(self) -> None: ...


class RequestParser:
    __slots__ = (
        "_sink", "_limits", "_parser", "_url", "_headers", "_header_bytes", "_in_head",
        "_head_bytes", "_chunked", "_chunks", "_overhead", "_body_bytes", "_max_body",
        "upgraded",
    )

    def __init__(self, sink: RequestSink, limits: Limits) -> None:
        self._sink = sink
        self._limits = limits
        self._parser = httptools.HttpRequestParser(self)
        self._max_body = limits.max_request_body
        self.upgraded = False
        self._reset()

    def _reset(self) -> None:
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._in_head = True
        self._head_bytes = 0
        self._chunked = False
        self._chunks = 0
        self._overhead = 0
        self._body_bytes = 0

    @property
    def mid_head(self) -> bool:
        """Part of a request head has arrived, not all of it (the 408 timer runs)."""
        return self._in_head and self._head_bytes > 0

    def feed(self, data: bytes) -> bytes:
        """Parse ``data``. Returns bytes that follow an upgrade request (to tunnel), else b""."""
        if self._in_head:
            self._head_bytes += len(data)
        elif self._chunked:
            self._overhead += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.upgraded = True
            return data[exc.args[0]:]
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, DownstreamProtocolError):
                raise cause from None
            raise
        except httptools.HttpParserError as exc:
            raise DownstreamProtocolError(f"malformed request: {exc}") from None
        if self._in_head and self._head_bytes > self._limits.max_request_line + self._limits.max_headers_size:
            if not self._headers:
                raise DownstreamProtocolError("request line too long", 414, "uri_too_long")
            raise DownstreamProtocolError("request headers too large", 431, "headers_too_large")
        if self._chunked and self._overhead - self._body_bytes > (self._chunks + 1) * _MAX_CHUNK_OVERHEAD:
            raise DownstreamProtocolError("chunk extensions too long")
        return b""

    # --- httptools callbacks ------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._reset()

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._limits.max_request_line:
            raise DownstreamProtocolError("request line too long", 414, "uri_too_long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # trailers: not forwarded
        self._headers.append((name, value))
        self._header_bytes += len(name) + len(value) + 4
        if len(self._headers) > self._limits.max_header_count:
            raise DownstreamProtocolError("too many request headers", 431, "headers_too_large")
        if self._header_bytes > self._limits.max_headers_size:
            raise DownstreamProtocolError("request headers too large", 431, "headers_too_large")

    def on_headers_complete(self) -> None:
        head = self._build_head()
        self._in_head = False
        self._chunked = head.chunked
        self._overhead = 0
        limit = self._max_body
        if limit is not None and head.content_length is not None and head.content_length > limit:
            raise DownstreamProtocolError(
                f"request body of {head.content_length} bytes exceeds the limit of {limit}",
                413, "payload_too_large")
        self._sink.on_request(head)

    def on_chunk_header(self) -> None:
        self._chunks += 1

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        limit = self._max_body
        if limit is not None and self._body_bytes > limit:
            raise DownstreamProtocolError(
                f"request body exceeds the limit of {limit} bytes", 413, "payload_too_large")
        self._sink.on_body(body)

    def on_message_complete(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        self._chunked = False
        self._sink.on_request_end()

    # --- validation -----------------------------------------------------------------------
    def _build_head(self) -> RequestHead:
        parser = self._parser
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise DownstreamProtocolError(f"HTTP version {version} is not supported", 505,
                                          "http_version_not_supported")
        method = parser.get_method().decode("ascii")
        if method == "CONNECT":
            raise DownstreamProtocolError("CONNECT is not supported", 405, "method_not_allowed")

        hosts: list[bytes] = []
        content_length: int | None = None
        chunked = False
        connection: list[bytes] = []
        upgrade: bytes | None = None
        expect = False
        kept: list[tuple[bytes, bytes]] = []
        underscores_ok = self._limits.allow_underscores_in_headers
        for raw_name, value in self._headers:
            name = raw_name.lower()
            if name in HOP_BY_HOP:
                if name == b"host":
                    hosts.append(value)
                elif name == b"content-length":
                    content_length = int(value)  # llhttp checked digits and duplicates
                elif name == b"transfer-encoding":
                    if value.strip().lower() != b"chunked":
                        raise DownstreamProtocolError(
                            "Transfer-Encoding other than a single chunked is refused")
                    chunked = True
                elif name == b"connection":
                    connection.append(value)
                elif name == b"upgrade":
                    upgrade = value
                elif name == b"expect":
                    if value.strip().lower() != b"100-continue":
                        raise DownstreamProtocolError("unsupported Expect", 417,
                                                      "expectation_failed")
                    expect = True
                continue
            if not underscores_ok and b"_" in name:
                raise DownstreamProtocolError(
                    f"header name with underscore refused: {name.decode('latin-1')}")
            kept.append((name, value))

        tokens = connection_tokens(connection) if connection else set()
        if tokens:
            # headers the client named in Connection are hop-by-hop too
            kept = [(n, v) for n, v in kept if n not in tokens]
        if upgrade is not None and b"upgrade" not in tokens:
            upgrade = None

        target, authority = self._target(method)
        if authority is None:
            if len(hosts) > 1:
                raise DownstreamProtocolError("more than one Host header")
            if not hosts:
                if version == "1.1":
                    raise DownstreamProtocolError("HTTP/1.1 request without Host")
                authority = ""
            else:
                authority = _check_host(hosts[0])
        path = target.partition(b"?")[0].decode("latin-1")
        keep_alive = parser.should_keep_alive()
        return RequestHead(
            method=method, target=target, path=path, authority=authority,
            host=_strip_port(authority), version=version, headers=kept,
            content_length=content_length, chunked=chunked, keep_alive=keep_alive,
            upgrade=upgrade, expect_continue=expect,
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


def _check_host(value: bytes) -> str:
    host = value.strip().lower()
    if not host or b"," in host or not _HOST_CHARS.issuperset(host):
        raise DownstreamProtocolError("invalid Host")
    return host.decode("ascii")


def _strip_port(authority: str) -> str:
    if authority.startswith("["):
        return authority.partition("]")[0] + "]"
    return authority.partition(":")[0]
