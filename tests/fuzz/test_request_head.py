"""Property tests of the downstream request parser and the head we forward (issue 12).

For any bytes, the parser either refuses them with ``DownstreamProtocolError`` or hands on
requests such that: the outcome does not depend on how the bytes were split into reads; what
the router would forward (``writer.request_head`` plus its framing header) carries no CR, LF
or NUL in a name, value, target or authority, never both Content-Length and
Transfer-Encoding, and re-parses to the same request with the same body.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import example, given
from hypothesis import strategies as st

from sidecar.config.model import Limits
from sidecar.errors import DownstreamProtocolError
from sidecar.http.message import RequestHead
from sidecar.http.request_parser import RequestParser
from sidecar.http.writer import LAST_CHUNK, chunk, header_line, request_head

from .settings import fuzz_settings
from .strategies import HEADER_NAMES, body_framing, header_values, mutated, reads, splits_of

LIMITS = Limits(max_request_line=512, max_headers_size=2048, max_header_count=20,
                max_request_body=4096)
_TARGET_BYTES = list(b"az09/?&=%-._~:@!$'()*+,;#[]\"<>\\^`{|} \t\r\n\x00\x7f\x80\xff")
_FORBIDDEN = (b"\r", b"\n", b"\x00")


@dataclass
class Sink:
    heads: list[RequestHead] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    ends: int = 0

    def on_request(self, head: RequestHead) -> None:
        self.heads.append(head)
        self.bodies.append(b"")

    def on_body(self, data: bytes) -> None:
        self.bodies[-1] += data

    def on_request_end(self) -> None:
        self.ends += 1


def parse(pieces: list[bytes]) -> tuple[Sink, DownstreamProtocolError | None, bool]:
    """Feed the reads; the sink, the refusal (if any) and whether an upgrade stopped it."""
    sink = Sink()
    parser = RequestParser(sink, LIMITS)
    try:
        for piece in pieces:
            if parser.upgraded:
                return sink, None, True
            parser.feed(piece)
    except DownstreamProtocolError as exc:
        return sink, exc, parser.upgraded
    return sink, None, parser.upgraded


def forwarded(head: RequestHead, body: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """What the router sends upstream for this request (its framing rules, router._head)."""
    extra: list[tuple[bytes, bytes]] = []
    if head.chunked:
        extra.append((b"transfer-encoding", b"chunked"))
        framed = (chunk(body) if body else b"") + LAST_CHUNK
    elif head.content_length is not None:
        extra.append((b"content-length", b"%d" % head.content_length))
        framed = body
    else:
        framed = b""
    return request_head(head, [header_line(name, value) for name, value in extra]) + framed, extra


def view(head: RequestHead) -> tuple[object, ...]:
    return (head.method, head.target, head.path, head.authority, head.host, head.headers,
            head.content_length, head.chunked, head.upgrade, head.expect_continue)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"HEAD", b"OPTIONS", b"DELETE",
                                   b"CONNECT", b"get", b"M-SEARCH", b"PRI"]))
    target = draw(st.one_of(
        st.lists(st.sampled_from(_TARGET_BYTES), max_size=12).map(lambda b: b"/" + bytes(b)),
        st.sampled_from([b"*", b"http://orders/x?y", b"https://a@b/", b"HTTP://Orders:8080",
                         b"http://[::1]:80/p", b"orders:80", b"", b"//x"])))
    version = draw(st.sampled_from([b"1.1", b"1.1", b"1.0", b"2.0", b"0.9"]))
    headers = draw(st.lists(st.tuples(st.sampled_from(HEADER_NAMES), header_values()), max_size=6))
    if draw(st.booleans()):
        headers.insert(0, (b"Host", draw(st.sampled_from([b"orders", b"orders:8080", b"[::1]",
                                                           b"a,b", b"", b"Orders.Pake.Local"]))))
    body = draw(st.binary(max_size=40))
    kind = draw(st.sampled_from(["none", "length", "short", "chunked", "both"]))
    ext = draw(st.sampled_from([b"", b";a=b", b";" + b"x" * 300, b" ", b";\r"]))
    framing, framed = body_framing(body, kind, ext)
    sep = draw(st.sampled_from([b": ", b":", b":\t", b" : ", b": \r\n "]))
    lines = [method + b" " + target + b" HTTP/" + version]
    lines += [name + sep + value for name, value in headers + framing]
    message = b"\r\n".join(lines) + b"\r\n\r\n" + framed
    if draw(st.booleans()):  # a pipelined second request
        message += b"GET /second HTTP/1.1\r\nHost: orders\r\n\r\n"
    return draw(mutated(message)) if draw(st.booleans()) else message


def check_forwarded(head: RequestHead, body: bytes) -> None:
    data, extra = forwarded(head, body)
    names = [n for n, _ in head.headers] + [n for n, _ in extra]
    assert not (b"content-length" in names and b"transfer-encoding" in names), names
    assert names.count(b"content-length") + names.count(b"transfer-encoding") <= 1, names
    for part in [head.method.encode(), head.target, head.authority.encode(), *names,
                 *(v for _, v in head.headers)]:
        assert not any(c in part for c in _FORBIDDEN), part
    sink, error, _ = parse([data])
    if head.authority == "" and head.version == "1.0":
        # Known, left to the router's owners (see test_regressions): an HTTP/1.0 request
        # without Host is forwarded as HTTP/1.1 with an empty Host, which our own parser
        # refuses (tests/integration/test_http_framing.py pins that refusal).
        assert error is not None and error.status == 400
        return
    assert error is None, (error, data)
    assert sink.ends == 1 and len(sink.heads) == 1, data
    again = sink.heads[0]
    assert view(again) == view(head), data
    assert sink.bodies[0] == body


@fuzz_settings(200)
@given(requests(), reads())
@example(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;x\r\nhello\r\n0\r\n\r\n", [30, 70])
@example(b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\x00c\r\n\r\n", [])
def test_accepted_requests_forward_safely_and_reparse_identically(data: bytes, cuts: list[int]) -> None:
    whole, error, upgraded = parse([data])
    split, split_error, split_upgraded = parse(splits_of(data, cuts))
    # The outcome does not depend on the reads: refused either way, or the same requests.
    assert (error is None) == (split_error is None), (error, split_error)
    assert upgraded == split_upgraded
    if error is None:
        assert [view(h) for h in whole.heads] == [view(h) for h in split.heads]
        assert whole.bodies == split.bodies and whole.ends == split.ends
    for head, body in zip(whole.heads[:whole.ends], whole.bodies):
        if head.upgrade is None:
            check_forwarded(head, body)


@fuzz_settings(200)
@given(st.binary(max_size=300), reads())
def test_arbitrary_bytes_are_refused_or_parsed_never_crash(data: bytes, cuts: list[int]) -> None:
    """Nothing but ``DownstreamProtocolError`` escapes the parser (a 400, never a 500)."""
    sink, _, _ = parse(splits_of(data, cuts))
    for head, body in zip(sink.heads[:sink.ends], sink.bodies):
        if head.upgrade is None:
            check_forwarded(head, body)
