"""Serialising heads and framing bodies. Pure; every byte sent is made here from parsed
fields, never copied raw from the other side."""

from __future__ import annotations

from collections.abc import Callable
from http import HTTPStatus
from typing import Final

from ..errors import LocalReply
from .message import COMMON_METHODS, RequestHead
from .wire import HEAD

__all__ = ["chunk", "header_line", "LAST_CHUNK", "LengthLine", "local_reply", "reason_phrase", "request_head",
           "response_head"]

LAST_CHUNK: Final = b"0\r\n\r\n"
_REASONS: Final = {s.value: s.phrase.encode() for s in HTTPStatus}
# by status (0-599; None where there is no standard reason): its standard reason and the
# whole status line with it, the line most responses get. A tuple indexed by the status,
# not a dict: compiled, a look-up boxed and hashed the int (~100 instructions, callgrind).
_STATUS_LINES: Final[tuple[tuple[bytes, bytes] | None, ...]] = tuple(
    (_REASONS[status], b"HTTP/1.1 %d %b\r\n" % (status, _REASONS[status])) if status in _REASONS else None
    for status in range(600))


# the start of a request line for the methods requests name most ("GET "): one piece of the
# head's join, where encoding the method and a separate space were two (~250 instructions)
_METHOD_STARTS: Final = {method: method.encode() + b" " for method in COMMON_METHODS}


def reason_phrase(status: int) -> bytes:
    return _REASONS.get(status, b"Unknown")


def header_line(name: bytes, value: bytes) -> bytes:
    """One header line, CRLF included: one piece of a head's join, where a piece costs the
    join ~100 instructions (callgrind). The headers the sidecar adds (framing, forwarding,
    ids) come as such lines in a head's ``extra``, many made once (a constant, or once a
    connection); those forwarded are made here as the head is written."""
    return b"%b: %b\r\n" % (name, value)


class LengthLine:
    """The ``content-length`` line of one flow of messages (a connection's requests, or its
    responses), kept for the last length: a client asks for the same resources again, so a
    message is mostly as long as the one before, and the line formatted again cost ~400
    instructions (the int made text, a bytes build; callgrind)."""

    __slots__ = ("_length", "_line")

    def __init__(self) -> None:
        self._length = -1
        self._line = b""

    def line(self, length: int) -> bytes:
        if length != self._length:
            self._line = b"content-length: %d\r\n" % length
            self._length = length
        return self._line


def _joined_head(headers: list[tuple[bytes, bytes]], extra: list[bytes], tail: bytes, *parts: bytes) -> bytes:
    """``wire.HEAD`` as Python (the pure form): parts, a line a header, extra's lines, tail."""
    lines = list(parts)
    # one line a header (``header_line``: a bytes format, one build of three pieces), not
    # four appends of its pieces: the join's cost a piece made those slower, 719 against
    # 667 ns for the realistic profile's head and 214 against 187 ns for a one-header one
    # (compiled, timeit); ``lines += (name, b": ", value, b"\r\n")`` made a tuple as well
    for name, value in headers:
        lines.append(header_line(name, value))
    lines.extend(extra)
    lines.append(tail)
    return b"".join(lines)


# the compiled form's C call (sizes a head once and copies it once), else the join above
_HEAD: Final[Callable[..., bytes]] = HEAD if HEAD is not None else _joined_head


def request_head(head: RequestHead, extra: list[bytes], *, end: bool = True,
                 host_line: bytes | None = None) -> bytes:
    """The request line and headers for upstream: HTTP/1.1, Host from the authority,
    end-to-end headers (the head's block, then its pairs), then ``extra`` (framing and mesh
    headers, whole lines). ``end=False`` leaves off the blank line so a caller can add per-try
    headers. ``host_line``: the Host line of ``head.authority``, when the caller kept one made
    earlier."""
    start = _METHOD_STARTS.get(head.method)
    if start is None:
        start = head.method.encode() + b" "
    if host_line is None:
        host_line = header_line(b"host", head.authority.encode())
    return _HEAD(head.pairs, extra, b"\r\n" if end else b"", start, head.target, b" HTTP/1.1\r\n",
                 host_line, head.block)


def response_head(status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                  extra: list[bytes], block: bytes = b"") -> bytes:
    """The status line, ``block`` and ``headers`` (the upstream's, ``ResponseHead.block`` and
    ``pairs``, or a reply's own), then ``extra`` (framing and mesh headers, whole lines) and
    the blank line."""
    known = _STATUS_LINES[status] if 0 <= status < 600 else None
    if known is not None and known[0] == reason:  # one part, not five (~700 instructions in a join)
        return _HEAD(headers, extra, b"\r\n", known[1], block)
    return _HEAD(headers, extra, b"\r\n", b"HTTP/1.1 ", str(status).encode(), b" ", reason, b"\r\n", block)


def local_reply(reply: LocalReply, service: str, extra: list[bytes], *,
                head_only: bool = False) -> tuple[bytes, int]:
    """A reply the sidecar makes itself, JSON body and framing, its response flags in
    ``x-pake-flags`` (the access log's ``flags``: a client tells an open breaker from a full
    queue, or a refusal from the upstream's own 503, without parsing the body), then ``extra``
    (request id, connection: whole lines). Returns the bytes and how many of them are body."""
    body = reply.body(service)  # its length is the Content-Length even for HEAD
    lines = [b"content-type: application/json\r\n", b"content-length: %d\r\n" % len(body),
             header_line(b"x-pake-flags", reply.flag.encode()), *extra]
    head = response_head(reply.status, reason_phrase(reply.status), list(reply.headers), lines)
    return (head, 0) if head_only else (head + body, len(body))


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)
