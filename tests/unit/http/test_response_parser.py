"""The upstream response parser without sockets: bytes in, head/body/end out, hop-by-hop
headers gone, and whether the connection may carry the next request."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from sidecar.errors import UpstreamProtocolError
from sidecar.http.headers import HOP_BY_HOP
from sidecar.http.message import ResponseHead
from sidecar.http.response_parser import ResponseParser
from sidecar.http.writer import response_head


@dataclass
class Sink:
    heads: list[ResponseHead] = field(default_factory=list)
    body: bytes = b""
    ends: int = 0

    def on_response_head(self, head: ResponseHead) -> None:
        self.heads.append(head)

    def on_response_body(self, chunk: bytes) -> None:
        self.body += chunk

    def on_response_end(self) -> None:
        self.ends += 1


def parse(data: bytes, *, head_only: bool = False, piece: int | None = None) -> tuple[Sink, ResponseParser, bytes]:
    sink = Sink()
    parser = ResponseParser(sink)
    parser.begin(head_only)
    rest = b""
    step = piece or len(data)
    for i in range(0, len(data), step):
        rest += parser.feed(data[i:i + step])
    return sink, parser, rest


def refused(data: bytes) -> str:
    with pytest.raises(UpstreamProtocolError) as caught:
        parse(data)
    return str(caught.value)


@pytest.mark.parametrize("piece", [None, 1])
def test_content_length_response(piece: int | None) -> None:
    sink, parser, _ = parse(b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\nX-App: Yes\r\n\r\nhello", piece=piece)
    (head,) = sink.heads
    assert (head.status, head.reason, head.content_length, head.chunked) == (201, b"Created", 5, False)
    assert head.headers == [(b"X-App", b"Yes")], "end-to-end names are passed on as received"
    assert (sink.body, sink.ends, head.keep_alive, parser.reusable()) == (b"hello", 1, True, True)


@pytest.mark.parametrize("piece", [None, 1])
def test_chunked_response_is_dechunked(piece: int | None) -> None:
    sink, parser, _ = parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"5;x=y\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n", piece=piece)
    (head,) = sink.heads
    assert head.chunked and head.content_length is None and head.headers == []
    assert (sink.body, sink.ends, parser.reusable()) == (b"hello world", 1, True)


def test_a_head_and_a_large_body_in_one_read() -> None:
    """A fast upstream writes head and body at once: only the head counts against its bound."""
    body = b"b" * (1024 * 1024)
    sink, _, _ = parse(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    assert sink.body == body and sink.ends == 1


def test_hop_by_hop_and_connection_named_headers_are_removed() -> None:
    sink, _, _ = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: X-Private, keep-alive\r\n"
                       b"x-private: 1\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: x\r\n"
                       b"Trailer: X-T\r\nUpgrade: h2c\r\nX-Kept: 2\r\n\r\n")
    assert sink.heads[0].headers == [(b"X-Kept", b"2")]


@pytest.mark.parametrize("spell", [bytes.lower, bytes.title, bytes.upper, bytes.swapcase],
                         ids=["lower", "title", "upper", "mixed"])
def test_special_response_headers_are_recognised_in_any_spelling(spell: Callable[[bytes], bytes]) -> None:
    # the parser knows common spellings by a table and lowers only the rest: any spelling of a
    # hop-by-hop name is still dropped, and the upstream's request id still noticed
    names = [b"Content-Length", b"Connection", b"Keep-Alive", b"Proxy-Connection", b"te",
             b"Trailer", b"Upgrade", b"X-Request-Id", b"Content-Type", b"Vary"]
    n = [spell(name) for name in names]
    sink, _, _ = parse(b"HTTP/1.1 200 OK\r\n%s: 2\r\n%s: x-private\r\n%s: timeout=5\r\n"
                       b"%s: keep-alive\r\n%s: x\r\n%s: X-T\r\n%s: h2c\r\n%s: r-1\r\n%s: text/plain\r\n"
                       b"%s: accept\r\nX-Private: 1\r\n\r\nok" % tuple(n))
    head = sink.heads[0]
    # (plain lines first, then the request id the parser read: ``message.py``)
    assert head.headers == [(n[8], b"text/plain"), (n[9], b"accept"), (n[7], b"r-1")]
    assert (head.content_length, head.has_request_id, sink.body) == (2, True, b"ok")
    sink, _, _ = parse(b"HTTP/1.1 200 OK\r\n%s: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n" % spell(b"Transfer-Encoding"))
    assert sink.heads[0].chunked and sink.heads[0].headers == [] and sink.body == b"ok"


@pytest.mark.parametrize("spell", [bytes.lower, bytes.title, bytes.upper, bytes.swapcase],
                         ids=["lower", "title", "upper", "mixed"])
def test_every_hop_by_hop_name_is_dropped_in_any_spelling(spell: Callable[[bytes], bytes]) -> None:
    # the parser skips the name table for lengths no special name has: none may be missed
    lines = b"".join(b"%s: x\r\n" % spell(name) for name in sorted(HOP_BY_HOP - {b"transfer-encoding", b"content-length"}))
    sink, _, _ = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n" + lines + b"X-Kept: 2\r\n\r\n")
    assert sink.heads[0].headers == [(b"X-Kept", b"2")]


@pytest.mark.parametrize(("data", "keep_alive"), [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", True),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", False),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", False),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n", True),
])
def test_keep_alive(data: bytes, keep_alive: bool) -> None:
    assert parse(data)[0].heads[0].keep_alive is keep_alive


def test_a_kept_alive_connection_parses_the_next_response() -> None:
    sink = Sink()
    parser = ResponseParser(sink)
    for body in (b"one", b"three"):
        parser.begin(False)
        parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        assert parser.done and parser.reusable()
    assert sink.body == b"onethree" and sink.ends == 2


def test_a_response_to_head_ends_at_its_head() -> None:
    sink, parser, _ = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", head_only=True)
    assert sink.heads[0].content_length == 1234 and sink.ends == 1 and sink.body == b""
    assert parser.done and not parser.reusable(), "llhttp cannot be told to skip a HEAD body: never reuse"


@pytest.mark.parametrize("status", [204, 304])
def test_204_and_304_have_no_body(status: int) -> None:
    sink, parser, _ = parse(b"HTTP/1.1 %d X\r\nContent-Length: 7\r\n\r\n" % status)
    assert sink.ends == 1 and sink.body == b"" and parser.reusable()


def test_interim_responses_are_not_passed_on() -> None:
    sink, _, _ = parse(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                       b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert [h.status for h in sink.heads] == [200] and sink.body == b"ok" and sink.ends == 1


def test_101_hands_over_the_bytes_after_the_head() -> None:
    sink, parser, rest = parse(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                               b"Sec-WebSocket-Accept: abc\r\n\r\n\x81\x02hi")
    (head,) = sink.heads
    assert (head.status, head.upgrade, head.headers) == (101, b"websocket", [(b"Sec-WebSocket-Accept", b"abc")])
    assert rest == b"\x81\x02hi" and parser.upgraded and sink.ends == 1 and not parser.reusable()


def test_a_close_delimited_body_does_not_end_before_the_close() -> None:
    sink, parser, _ = parse(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
    (head,) = sink.heads
    assert head.content_length is None and not head.chunked and not head.keep_alive
    assert sink.body == b"all of it" and sink.ends == 0 and not parser.done


@pytest.mark.parametrize("coding", [b"gzip", b"gzip, chunked", b"chunked, gzip"])
def test_transfer_codings_other_than_chunked_are_refused(coding: bytes) -> None:
    """The sidecar re-frames bodies: a coding it dropped would reach the client undeclared."""
    refused(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + coding + b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n")


@pytest.mark.parametrize("data", [
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n", id="cl-and-te"),
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok", id="differing-cl"),
    pytest.param(b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 0\r\n\r\n", id="obs-fold"),
    pytest.param(b"HTTP/1.1 200 OK\nContent-Length: 0\n\n", id="bare-lf"),
    pytest.param(b"HTTP/1.1 2000 OK\r\n\r\n", id="bad-status"),
    pytest.param(b"SMTP ready\r\n\r\n", id="not-http"),
    pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", id="bad-chunk-size"),
])
def test_malformed_responses_are_refused(data: bytes) -> None:
    assert refused(data).startswith("malformed upstream response")


def test_a_response_head_is_bounded() -> None:
    sink = Sink()
    parser = ResponseParser(sink)
    parser.begin(False)
    parser.feed(b"HTTP/1.1 200 OK\r\nX-Big: ")
    with pytest.raises(UpstreamProtocolError, match="head too large"):
        for _ in range(1000):
            parser.feed(b"v" * 1024)
    assert sink.heads == []


def test_a_response_head_past_the_bound_in_its_first_read_is_refused_there() -> None:
    # The first read counts too: the response's start (llhttp's on_message_begin) once reset
    # the count after the read had added to it, so a head could pass the bound by one read.
    sink = Sink()
    parser = ResponseParser(sink)
    parser.begin(False)
    with pytest.raises(UpstreamProtocolError, match="head too large"):
        parser.feed(b"HTTP/1.1 200 OK\r\nX-Big: " + b"v" * (97 * 1024))
    assert sink.heads == []


def test_response_header_count_is_bounded() -> None:
    many = b"".join(b"X-%d: v\r\n" % i for i in range(201))
    assert "too many" in refused(b"HTTP/1.1 200 OK\r\n" + many + b"Content-Length: 0\r\n\r\n")


# === the order a head is forwarded in ===========================================================

RESPONSE = (b"HTTP/1.1 200 OK\r\nX-Request-Id: r-1\r\nContent-Type: a/b\r\nContent-Length: 2\r\n"
            b"Set-Cookie: a=1\r\nVary: x\r\nset-cookie: b=2\r\n\r\nok")


@pytest.mark.parametrize("piece", [None, 1, 9])
def test_plain_response_lines_come_first_as_received_then_the_request_id(piece: int | None) -> None:
    sink, _, _ = parse(RESPONSE, piece=piece)
    (head,) = sink.heads
    assert head.headers == [(b"Content-Type", b"a/b"), (b"Set-Cookie", b"a=1"), (b"Vary", b"x"),
                            (b"set-cookie", b"b=2"), (b"X-Request-Id", b"r-1")]
    assert response_head(head.status, head.reason, head.pairs, [], head.block) == (
        b"HTTP/1.1 200 OK\r\nContent-Type: a/b\r\nSet-Cookie: a=1\r\nVary: x\r\nset-cookie: b=2\r\n"
        b"X-Request-Id: r-1\r\n\r\n")


@pytest.mark.parametrize("named", [b"x-private", b"X-PRIVATE", b"close, X-Private"])
def test_a_plain_name_the_upstream_lists_in_connection_is_dropped(named: bytes) -> None:
    sink, _, _ = parse(b"HTTP/1.1 200 OK\r\nX-Private: 1\r\nVary: x\r\nConnection: " + named
                       + b"\r\nContent-Length: 0\r\n\r\n")
    assert sink.heads[0].headers == [(b"Vary", b"x")]


def test_connection_keep_alive_leaves_the_plain_response_lines_whole() -> None:
    sink, _, _ = parse(b"HTTP/1.1 200 OK\r\nVary: x\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n")
    assert sink.heads[0].headers == [(b"Vary", b"x")]
