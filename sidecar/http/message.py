"""A parsed HTTP/1.1 request head, as the filters, the router and the upstream see it.

Header names are lower-case bytes, values are bytes as received, hop-by-hop headers are
already removed (the parser keeps what framing needs in fields), so what a filter reads is
exactly what will be re-serialised upstream. Pure: no asyncio imports.

A head's headers are in two parts: ``block``, the plain lines as the compiled form's parser
wrote them (``wire.py``: one bytes object, ``name: value\r\n`` a line, no name the parsers
read or drop), then ``pairs``, the rest as (name, value). A head is written in that order.
``headers`` is the whole as pairs: reading it takes the block apart, once, so a proxy that no
filter asks about headers never makes a pair of a plain line (~400 instructions a line).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from .headers import REQUEST_SPECIAL

__all__ = ["COMMON_METHODS", "RequestHead", "ResponseHead", "block_pairs", "block_without"]

# the methods requests name most: the parser and the writer keep a ready form of each
COMMON_METHODS: Final = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")


@dataclass(slots=True)
class RequestHead:
    method: str  # "GET"
    target: bytes  # origin-form target as forwarded: path and query
    path: str  # the path without the query, for routing and policy
    authority: str  # lower-case host[:port] (the absolute-form target's wins over Host)
    host: str  # authority without the port
    version: str  # "1.1" or "1.0"
    pairs: list[tuple[bytes, bytes]]  # end-to-end headers after the block's, lower-case names, in order
    content_length: int | None = None
    chunked: bool = False
    keep_alive: bool = True
    upgrade: bytes | None = None  # the Upgrade header (e.g. b"websocket") when asked for
    expect_continue: bool = False
    forwarded_for: bytes | None = None  # X-Forwarded-For as received (kept out of headers)
    forwarded_proto: bytes | None = None  # X-Forwarded-Proto as received (also in headers)
    request_id: bytes | None = None  # X-Request-ID as received; once the listener has it, as forwarded (also in headers)
    # W3C trace context as received (both also in headers), picked out by the parser's one
    # pass over the headers so that tracing reads no header list: b"" when sent twice
    traceparent: bytes | None = None
    tracestate: bool = False
    # the (name, value) pair of ``request_id`` in headers: the response echoes it as that
    # object (``Stream.on_response_head``). A tuple of any length to the compiler: a pair
    # would be kept unboxed, and made again each time it is read as an object.
    request_id_pair: tuple[bytes, ...] | None = None
    block: bytes = b""  # end-to-end lines before pairs, as written (lower-case names; see above)

    # Written out because the dataclass-generated ``__init__`` is interpreted Python even when
    # this module is compiled (one head per request; see ``Exchange.__init__``).
    def __init__(self, method: str, target: bytes, path: str, authority: str, host: str, version: str,
                 headers: list[tuple[bytes, bytes]], content_length: int | None = None,
                 chunked: bool = False, keep_alive: bool = True, upgrade: bytes | None = None,
                 expect_continue: bool = False, forwarded_for: bytes | None = None,
                 forwarded_proto: bytes | None = None, request_id: bytes | None = None,
                 traceparent: bytes | None = None, tracestate: bool = False,
                 request_id_pair: tuple[bytes, ...] | None = None, block: bytes = b"") -> None:
        self.method = method
        self.target = target
        self.path = path
        self.authority = authority
        self.host = host
        self.version = version
        self.pairs = headers
        self.block = block
        self.content_length = content_length
        self.chunked = chunked
        self.keep_alive = keep_alive
        self.upgrade = upgrade
        self.expect_continue = expect_continue
        self.forwarded_for = forwarded_for
        self.forwarded_proto = forwarded_proto
        self.request_id = request_id
        self.traceparent = traceparent
        self.tracestate = tracestate
        self.request_id_pair = request_id_pair

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """End-to-end headers, lower-case names, in the order forwarded: the block taken apart
        into ``pairs`` (the same list object, before what was there) the first time."""
        if len(self.block):
            self.pairs[0:0] = block_pairs(self.block)
            self.block = b""
        return self.pairs

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
        """Drop every header with one of ``names``: used to strip what outsiders may not set.
        Names the parser reads itself are never in the block, which is left whole for them."""
        pairs = self.pairs
        if len(self.block):
            for name in names:
                if name not in REQUEST_SPECIAL:
                    pairs = self.headers  # (the block taken apart: the name may be there)
                    break
        if any(key in names for key, _ in pairs):
            self.pairs = [(k, v) for k, v in pairs if k not in names]


@dataclass(slots=True)
class ResponseHead:
    status: int
    reason: bytes
    pairs: list[tuple[bytes, bytes]]  # headers after the block's, names as received
    content_length: int | None = None
    chunked: bool = False
    keep_alive: bool = True
    upgrade: bytes | None = None  # the Upgrade header of a 101
    has_request_id: bool = False  # the upstream set x-request-id itself
    block: bytes = b""  # lines before pairs, as received (names too; see above)

    def __init__(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]] | None = None,
                 content_length: int | None = None, chunked: bool = False, keep_alive: bool = True,
                 upgrade: bytes | None = None, has_request_id: bool = False, block: bytes = b"") -> None:
        self.status = status
        self.reason = reason
        self.pairs = [] if headers is None else headers
        self.content_length = content_length
        self.chunked = chunked
        self.keep_alive = keep_alive
        self.upgrade = upgrade
        self.has_request_id = has_request_id
        self.block = block

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """Headers in the order forwarded (``RequestHead.headers``)."""
        if len(self.block):
            self.pairs[0:0] = block_pairs(self.block)
            self.block = b""
        return self.pairs


def block_pairs(block: bytes) -> list[tuple[bytes, bytes]]:
    """A block's lines as (name, value) pairs. The parser wrote each ``name: value\r\n``, a
    name being a token (no colon) and llhttp having refused CR and LF in values, so the first
    ": " of a line ends its name."""
    pairs: list[tuple[bytes, bytes]] = []
    for line in block.split(b"\r\n"):
        if len(line):
            name, _, value = line.partition(b": ")
            pairs.append((name, value))
    return pairs


def block_without(block: bytes, tokens: set[bytes], never: frozenset[bytes],
                  any_case: bool) -> list[tuple[bytes, bytes]] | None:
    """The block's lines as pairs without those a ``Connection`` header named (``tokens``,
    lower case), or None when it has none of them: the block then stays whole. ``never``:
    names never in a block (the parser reads or drops them itself), not looked for.
    ``any_case``: the block's names are as received (a response's), not lower case."""
    searched = b""
    for token in tokens:
        if token in never:
            continue
        if not len(searched):
            searched = block.lower() if any_case else block
        if searched.startswith(token + b":") or b"\r\n" + token + b":" in searched:
            return [pair for pair in block_pairs(block)
                    if (pair[0].lower() if any_case else pair[0]) not in tokens]
    return None
