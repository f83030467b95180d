"""Property tests of the upstream response parser (issue 12).

For any bytes, the parser either refuses them with ``UpstreamProtocolError`` or hands on a
response whose kept headers hold no hop-by-hop name (we re-frame), no CR, LF or NUL in a
name, value or reason; the outcome does not depend on how the bytes were split into reads;
and the response as the sidecar re-frames it downstream (``writer.response_head``, the
stream's framing rules for an HTTP/1.1 GET) re-parses to the same head and body.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import httptools
from hypothesis import example, given
from hypothesis import strategies as st

from sidecar.errors import UpstreamProtocolError
from sidecar.http.headers import HOP_BY_HOP, connection_tokens
from sidecar.http.message import ResponseHead
from sidecar.http.response_parser import ResponseParser
from sidecar.http.writer import LAST_CHUNK, chunk, header_line, response_head

from .settings import fuzz_settings
from .strategies import HEADER_NAMES, body_framing, header_values, mutated, reads, splits_of

_FORBIDDEN = (b"\r", b"\n", b"\x00")
_NO_BODY = (204, 304)


@dataclass
class Sink:
    heads: list[ResponseHead] = field(default_factory=list)
    body: bytes = b""
    ends: int = 0

    def on_response_head(self, head: ResponseHead) -> None:
        self.heads.append(head)

    def on_response_body(self, data: bytes) -> None:
        self.body += data

    def on_response_end(self) -> None:
        self.ends += 1


def parse(pieces: list[bytes], head_only: bool = False) -> tuple[Sink, UpstreamProtocolError | None]:
    sink = Sink()
    parser = ResponseParser(sink)
    parser.begin(head_only)
    try:
        for piece in pieces:
            if parser.upgraded:
                break
            if parser.done and piece:  # UpstreamConnection closes on bytes after a response
                raise UpstreamProtocolError("bytes after the response")
            parser.feed(piece)
    except UpstreamProtocolError as exc:
        return sink, exc
    return sink, None


def view(head: ResponseHead) -> tuple[object, ...]:
    return (head.status, head.reason, head.headers, head.upgrade)


@st.composite
def responses(draw: st.DrawFn) -> bytes:
    status = draw(st.sampled_from([b"200", b"200", b"204", b"304", b"404", b"503", b"101",
                                   b"100", b"999", b"099", b"20", b"2000"]))
    reason = draw(st.sampled_from([b" OK", b" ", b"", b" Not\tFound", b" caf\xc3\xa9",
                                   b" a\x00b", b" a\rb", b" \x7f"]))
    headers = draw(st.lists(st.tuples(st.sampled_from(HEADER_NAMES), header_values()), max_size=6))
    body = draw(st.binary(max_size=40))
    kind = draw(st.sampled_from(["none", "length", "short", "chunked", "both"]))
    ext = draw(st.sampled_from([b"", b";a=b", b" "]))
    framing, framed = body_framing(body, kind, ext)
    lines = [b"HTTP/1.1 " + status + reason]
    lines += [name + b": " + value for name, value in headers + framing]
    message = b"\r\n".join(lines) + b"\r\n\r\n" + framed
    if draw(st.booleans()):
        message = b"HTTP/1.1 100 Continue\r\n\r\n" + message
    return draw(mutated(message)) if draw(st.booleans()) else message


def reframed(head: ResponseHead, body: bytes) -> bytes:
    """The response as the downstream stream writes it to an HTTP/1.1 GET (stream.py)."""
    extra: list[tuple[bytes, bytes]] = []
    if head.status in _NO_BODY:
        if head.content_length is not None and head.status != 204:
            extra.append((b"content-length", b"%d" % head.content_length))
        framed = b""
    elif head.content_length is not None:
        extra.append((b"content-length", b"%d" % head.content_length))
        framed = body
    else:
        extra.append((b"transfer-encoding", b"chunked"))
        framed = (chunk(body) if body else b"") + LAST_CHUNK
    return response_head(head.status, head.reason, head.headers,
                         [header_line(name, value) for name, value in extra]) + framed


def check(sink: Sink) -> None:
    for head in sink.heads:
        for name, value in head.headers:
            assert name.lower() not in HOP_BY_HOP, name
            assert not any(c in name or c in value for c in _FORBIDDEN), (name, value)
        assert not any(c in head.reason for c in _FORBIDDEN), head.reason
    if sink.ends != 1 or len(sink.heads) != 1 or sink.heads[0].status == 101:
        return
    head = sink.heads[0]
    data = reframed(head, sink.body)
    again, error = parse([data])
    assert error is None, (error, data)
    assert again.ends == 1 and [view(h) for h in again.heads] == [view(head)], data
    assert again.body == (b"" if head.status in _NO_BODY else sink.body)


@fuzz_settings(200)
@given(responses(), reads())
@example(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;a=b\r\nabc\r\n0\r\n\r\n", [20, 60])
def test_responses_are_refused_or_reframe_identically(data: bytes, cuts: list[int]) -> None:
    whole, error = parse([data])
    split, split_error = parse(splits_of(data, cuts))
    assert (error is None) == (split_error is None), (error, split_error)
    if error is None:
        assert [view(h) for h in whole.heads] == [view(h) for h in split.heads]
        assert (whole.body, whole.ends) == (split.body, split.ends)
    check(whole)


@fuzz_settings(200)
@given(st.binary(max_size=300), reads(), st.booleans())
def test_arbitrary_bytes_never_crash_the_response_parser(data: bytes, cuts: list[int],
                                                         head_only: bool) -> None:
    """Nothing but ``UpstreamProtocolError`` escapes (a 502 ``UPE``, never a crash)."""
    sink, _ = parse(splits_of(data, cuts), head_only)
    for head in sink.heads:
        for name, value in head.headers:
            assert not any(c in name or c in value for c in _FORBIDDEN), (name, value)


class _Reference:
    """llhttp's own view of a response's header lines (httptools' per-line callbacks)."""

    def __init__(self) -> None:
        self.heads: list[list[tuple[bytes, bytes]]] = []
        self.lines: list[tuple[bytes, bytes]] = []

    def on_message_begin(self) -> None:
        self.lines = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.lines.append((name, value))

    def on_headers_complete(self) -> None:
        self.heads.append(self.lines)


def reference_headers(data: bytes) -> list[list[tuple[bytes, bytes]]] | None:
    """Each head's header lines as llhttp calls them back, or None when it refuses the bytes."""
    reference = _Reference()
    try:
        httptools.HttpResponseParser(reference).feed_data(data)
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserError:
        return None
    return reference.heads


def end_to_end(lines: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """What the parser keeps of a final response's lines: no hop-by-hop or Connection-named
    header."""
    tokens = connection_tokens([v for n, v in lines if n.lower() == b"connection"])
    return [(n, v) for n, v in lines if n.lower() not in HOP_BY_HOP and n.lower() not in tokens]


@fuzz_settings(300)
@given(responses(), reads())
@example(b"\r\n\r\nHTTP/1.1 200 OK\r\nA: b:c \t\r\nB:\r\ncontent-length: 0\r\n\r\n", [3, 20])
@example(b"HTTP/1.1 200 OK\r\nX:1\r\nY:\t 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", [])
@example(b"HTTP/1.1 100 Continue\r\nX-I: 1\r\n\r\nHTTP/1.1 204 No\r\nX-F: 2\r\n\r\n", [30, 31, 32])
def test_header_lines_are_split_as_llhttp_reads_them(data: bytes, cuts: list[int]) -> None:
    # For any response, however it arrives in reads, the lines the parser keeps are exactly
    # the ones llhttp reads, name and value byte for byte, less the hop-by-hop ones. (Kept
    # from a try at splitting the head ourselves, which cost more than httptools' callbacks.)
    reference = reference_headers(data)
    if reference is None:
        return
    for pieces in ([data], splits_of(data, cuts)):
        sink, error = parse(pieces)
        if error is None and sink.heads:
            assert [h.headers for h in sink.heads] == [end_to_end(reference[-1])], (pieces, reference)
