"""The downstream request parser without sockets: bytes in, heads/body/end (or a refusal with
its status) out. Whatever the bytes' split into reads, the outcome must be the same."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from sidecar.config.model import Limits
from sidecar.errors import DownstreamProtocolError
from sidecar.http.headers import content_length_value, is_valid_request_id
from sidecar.http.message import RequestHead
from sidecar.http.request_parser import _KNOWN, _PLAIN, _SPECIAL, RequestParser
from sidecar.http.writer import request_head


@dataclass
class Sink:
    heads: list[RequestHead] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)  # one joined body per request
    ends: int = 0

    def on_request(self, head: RequestHead) -> None:
        self.heads.append(head)
        self.bodies.append(b"")

    def on_body(self, chunk: bytes) -> None:
        self.bodies[-1] += chunk

    def on_request_end(self) -> None:
        self.ends += 1


def parse(data: bytes, limits: Limits = Limits(), *, piece: int | None = None) -> Sink:
    """Feed ``data`` in one read, or in reads of ``piece`` bytes."""
    sink = Sink()
    parser = RequestParser(sink, limits)
    step = piece or len(data) or 1
    for i in range(0, len(data), step):
        assert parser.feed(data[i:i + step]) == b""
    return sink


def refusal(data: bytes, limits: Limits = Limits(), *, piece: int | None = None) -> tuple[int, str]:
    with pytest.raises(DownstreamProtocolError) as caught:
        parse(data, limits, piece=piece)
    return caught.value.status, caught.value.error


def one(data: bytes, limits: Limits = Limits()) -> tuple[RequestHead, bytes]:
    sink = parse(data, limits)
    assert len(sink.heads) == 1 and sink.ends == 1
    return sink.heads[0], sink.bodies[0]


CHUNKED = b"POST /c HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding: chunked\r\n\r\n"


# === what a valid request becomes ===============================================================


def test_a_request_head_has_what_routing_and_forwarding_need() -> None:
    head, body = one(b"GET /a/b?x=1&y=2 HTTP/1.1\r\nHost: Echo:8080\r\nAccept: */*\r\nX-Custom: Value  \r\n\r\n")
    assert (head.method, head.target, head.path) == ("GET", b"/a/b?x=1&y=2", "/a/b")
    assert (head.authority, head.host, head.version) == ("echo:8080", "echo", "1.1")
    assert head.headers == [(b"accept", b"*/*"), (b"x-custom", b"Value")]
    assert head.keep_alive and not head.has_body and head.upgrade is None and body == b""


def test_ipv6_authority_keeps_its_brackets() -> None:
    head, _ = one(b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n")
    assert (head.authority, head.host) == ("[::1]:8080", "[::1]")


def test_hop_by_hop_and_connection_named_headers_are_not_forwarded() -> None:
    head, _ = one(b"GET / HTTP/1.1\r\nHost: echo\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n"
                  b"Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\nTrailer: X-T\r\n"
                  b"Upgrade: h2c\r\nX-End: 2\r\n\r\n")
    assert head.headers == [(b"x-end", b"2")]
    assert head.upgrade is None, "Upgrade counts only when Connection names it"


def test_headers_only_the_mesh_may_set_are_dropped() -> None:
    head, _ = one(b"GET / HTTP/1.1\r\nHost: echo\r\nX-Pake-Peer-Identity: spiffe://pake.local/service/x\r\n"
                  b"X-PAKE-Attempts: 3\r\n\r\n")
    assert head.headers == []


def test_forwarding_headers_and_request_id_are_collected() -> None:
    head, _ = one(b"GET / HTTP/1.1\r\nHost: echo\r\nX-Forwarded-For: 10.0.0.1\r\nX-Request-ID: abc\r\n"
                  b"X-Forwarded-For: 10.0.0.2\r\nX-Forwarded-Proto: https\r\n\r\n")
    assert head.forwarded_for == b"10.0.0.1, 10.0.0.2"
    assert head.forwarded_proto == b"https" and head.request_id == b"abc"
    assert (b"x-forwarded-for", b"10.0.0.1") not in head.headers, "the sidecar appends it itself"
    assert head.header(b"x-request-id") == b"abc" and head.header(b"x-forwarded-proto") == b"https"


@pytest.mark.parametrize(("target", "forwarded", "authority"), [
    (b"http://echo/p?q=1", b"/p?q=1", "echo"),
    (b"http://ECHO:8080/p", b"/p", "echo:8080"),
    (b"https://echo", b"/", "echo"),
    (b"http://echo?q=2", b"/?q=2", "echo"),
])
def test_absolute_form_target_wins_over_host(target: bytes, forwarded: bytes, authority: str) -> None:
    head, _ = one(b"GET " + target + b" HTTP/1.1\r\nHost: other.example\r\n\r\n")
    assert (head.target, head.authority) == (forwarded, authority)


def test_http10_defaults_to_close_and_needs_no_host() -> None:
    head, _ = one(b"GET / HTTP/1.0\r\n\r\n")
    assert (head.version, head.authority, head.keep_alive) == ("1.0", "", False)
    head, _ = one(b"GET / HTTP/1.0\r\nHost: echo\r\nConnection: keep-alive\r\n\r\n")
    assert head.keep_alive


def test_connection_close_is_honoured() -> None:
    head, _ = one(b"GET / HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n")
    assert not head.keep_alive


@pytest.mark.parametrize("piece", [None, 1])
def test_names_are_forwarded_in_lower_case_however_the_client_spelled_them(piece: int | None) -> None:
    sink = parse(b"GET / HTTP/1.1\r\nHost: echo\r\nAccept: a\r\naccept-language: b\r\nUSER-AGENT: c\r\n"
                 b"X-Custom: d\r\nx-lower: e\r\nCookie: f\r\n\r\n", piece=piece)
    assert sink.heads[0].headers == [(b"accept", b"a"), (b"accept-language", b"b"), (b"user-agent", b"c"),
                                     (b"x-custom", b"d"), (b"x-lower", b"e"), (b"cookie", b"f")]


def test_value_bytes_are_kept_as_received() -> None:
    head, _ = one(b"GET / HTTP/1.1\r\nHost: echo\r\nX-Name: caf\xc3\xa9 \t\"q\"\r\n\r\n")
    assert head.header(b"x-name") == b"caf\xc3\xa9 \t\"q\""


# === bodies =====================================================================================


def test_content_length_body() -> None:
    head, body = one(b"POST / HTTP/1.1\r\nHost: echo\r\nContent-Length: 5\r\n\r\nhello")
    assert (head.content_length, head.chunked, head.has_body, body) == (5, False, True, b"hello")


def test_chunked_body_is_dechunked_and_trailers_are_not_headers() -> None:
    head, body = one(CHUNKED + b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: t\r\n\r\n")
    assert head.chunked and head.content_length is None and body == b"hello world"
    assert head.header(b"x-trailer") is None


@pytest.mark.parametrize("split", range(1, 95))
def test_any_split_into_two_reads_gives_the_same_request(split: int) -> None:
    data = CHUNKED + b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    sink = Sink()
    parser = RequestParser(sink, Limits())
    parser.feed(data[:split])
    parser.feed(data[split:])
    assert [h.target for h in sink.heads] == [b"/c"] and sink.bodies == [b"hello world"] and sink.ends == 1


def test_byte_by_byte_reads_give_the_same_requests() -> None:
    data = (CHUNKED + b"3\r\nabc\r\n0\r\n\r\n" + b"POST /l HTTP/1.1\r\nHost: echo\r\nContent-Length: 2\r\n\r\nhi")
    sink = parse(data, piece=1)
    assert [h.target for h in sink.heads] == [b"/c", b"/l"] and sink.bodies == [b"abc", b"hi"]


def test_pipelined_requests_in_one_read_come_out_in_order() -> None:
    data = b"".join(b"GET /%d HTTP/1.1\r\nHost: echo\r\n\r\n" % i for i in range(5))
    sink = parse(data)
    assert [h.target for h in sink.heads] == [b"/%d" % i for i in range(5)] and sink.ends == 5


def test_a_large_pipelined_head_after_a_chunked_request_is_not_a_chunk_extension() -> None:
    """The bytes of the next request in the same read are not overhead of the chunked body."""
    data = CHUNKED + b"5\r\nhello\r\n0\r\n\r\n" + b"GET /next HTTP/1.1\r\nHost: echo\r\nCookie: " + \
        b"c" * 6000 + b"\r\n\r\n"
    sink = parse(data)
    assert [h.target for h in sink.heads] == [b"/c", b"/next"] and sink.ends == 2


def test_chunked_body_with_many_chunks_is_accepted() -> None:
    body = b"".join(b"%x\r\n%s\r\n" % (n, b"z" * n) for n in [1] * 2000 + [4096] * 20)
    _, got = one(CHUNKED + body + b"0\r\n\r\n")
    assert got == b"z" * (2000 + 4096 * 20)


@pytest.mark.parametrize("piece", [None, 1000, 1])
def test_chunk_extensions_are_bounded(piece: int | None) -> None:
    data = CHUNKED + b"5;name=" + b"v" * 8000 + b"\r\nhello\r\n0\r\n\r\n"
    assert refusal(data, piece=piece) == (400, "bad_request")
    assert parse(CHUNKED + b"5;name=" + b"v" * 1000 + b"\r\nhello\r\n0\r\n\r\n", piece=piece).bodies == [b"hello"]


def test_expect_100_continue_is_noted_and_other_expectations_refused() -> None:
    head, _ = one(b"POST / HTTP/1.1\r\nHost: echo\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\nx")
    assert head.expect_continue and head.header(b"expect") is None
    assert refusal(b"GET / HTTP/1.1\r\nHost: echo\r\nExpect: 200-ok\r\n\r\n") == (417, "expectation_failed")


def test_upgrade_returns_the_bytes_after_the_head() -> None:
    sink = Sink()
    parser = RequestParser(sink, Limits())
    rest = parser.feed(b"GET /ws HTTP/1.1\r\nHost: echo\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                       b"Sec-WebSocket-Version: 13\r\n\r\n\x81\x05hello")
    assert parser.upgraded and rest == b"\x81\x05hello"
    assert sink.heads[0].upgrade == b"websocket"
    assert sink.heads[0].header(b"sec-websocket-version") == b"13"


# === bounds ======================================================================================


def test_mid_head_is_true_only_while_a_head_is_incomplete() -> None:
    parser = RequestParser(Sink(), Limits())
    assert not parser.mid_head
    parser.feed(b"GET / HTTP/1.1\r\nHo")
    assert parser.mid_head
    parser.feed(b"st: echo\r\n\r\n")
    assert not parser.mid_head


@pytest.mark.parametrize("piece", [None, 100])
def test_request_line_bound(piece: int | None) -> None:
    limits = Limits(max_request_line=256)
    assert refusal(b"GET /" + b"a" * 256 + b" HTTP/1.1\r\nHost: echo\r\n\r\n", limits, piece=piece) == \
        (414, "uri_too_long")
    assert one(b"GET /" + b"a" * 250 + b" HTTP/1.1\r\nHost: echo\r\n\r\n", limits)[0].path == "/" + "a" * 250


def test_header_bounds() -> None:
    limits = Limits(max_headers_size=1024, max_header_count=4)
    headers = b"".join(b"X-%d: %s\r\n" % (i, b"v" * 300) for i in range(4))
    assert refusal(b"GET / HTTP/1.1\r\nHost: echo\r\n" + headers + b"\r\n", limits) == (431, "headers_too_large")
    three = b"".join(b"X-%d: v\r\n" % i for i in range(3))
    assert one(b"GET / HTTP/1.1\r\nHost: echo\r\n" + three + b"\r\n", limits)[0].header(b"x-2") == b"v"
    assert refusal(b"GET / HTTP/1.1\r\nHost: echo\r\n" + three + b"X-3: v\r\n\r\n", limits) == \
        (431, "headers_too_large")


def test_an_endless_header_is_refused_before_it_ends() -> None:
    """Nothing waits for the end of a head that is already too large: memory stays bounded."""
    limits = Limits(max_request_line=1024, max_headers_size=4096)
    parser = RequestParser(Sink(), limits)
    parser.feed(b"GET / HTTP/1.1\r\nHost: echo\r\nX-Big: ")
    fed = 0
    with pytest.raises(DownstreamProtocolError) as caught:
        while fed < 1 << 20:
            parser.feed(b"v" * 512)
            fed += 512
    assert caught.value.status == 431 and fed <= 1024 + 4096


def test_body_bound() -> None:
    limits = Limits(max_request_body=10)
    sink = Sink()
    with pytest.raises(DownstreamProtocolError) as caught:
        RequestParser(sink, limits).feed(b"POST / HTTP/1.1\r\nHost: echo\r\nContent-Length: 11\r\n\r\n")
    assert (caught.value.status, sink.heads) == (413, []), "a declared length is refused before anything"
    sink = Sink()
    with pytest.raises(DownstreamProtocolError) as caught:
        RequestParser(sink, limits).feed(CHUNKED + b"6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n")
    # a chunked body is handed on read by read, once the read passed its checks: nothing of
    # the read that crossed the bound is passed on (not even the bytes before it)
    assert caught.value.status == 413 and sink.bodies == [b""], "no byte of a refused read is passed on"
    sink = Sink()
    parser = RequestParser(sink, limits)
    parser.feed(CHUNKED + b"6\r\nhello \r\n")
    with pytest.raises(DownstreamProtocolError):
        parser.feed(b"5\r\nworld\r\n0\r\n\r\n")
    assert sink.bodies == [b"hello "], "earlier reads went on; the refused one did not"
    assert one(b"POST / HTTP/1.1\r\nHost: echo\r\nContent-Length: 10\r\n\r\n0123456789", limits)[1] == b"0123456789"


def test_underscores_in_names_only_when_allowed() -> None:
    data = b"GET / HTTP/1.1\r\nHost: echo\r\nX_User: alice\r\n\r\n"
    assert refusal(data) == (400, "bad_request")
    head, _ = one(data, Limits(allow_underscores_in_headers=True))
    assert head.header(b"x_user") == b"alice"


# === refusals ======================================================================================

H = b"Host: echo\r\n"
REFUSED = [
    ("cl-and-te", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    ("differing-cl", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\n", 400),
    ("te-gzip", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\n", 400),
    ("te-chunked-not-last", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, gzip\r\n\r\n", 400),
    ("te-gzip-chunked", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n", 400),
    ("bad-chunk-size", CHUNKED + b"xyz\r\n", 400),
    ("chunk-data-too-long", CHUNKED + b"2\r\nabc\r\n", 400),
    ("obs-fold", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\r\n b\r\n\r\n", 400),
    ("space-before-colon", b"GET / HTTP/1.1\r\n" + H + b"X-A : a\r\n\r\n", 400),
    ("invalid-name", b"GET / HTTP/1.1\r\n" + H + b"X{A}: a\r\n\r\n", 400),
    ("nul-in-value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x00\r\n\r\n", 400),
    ("cr-in-value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\rb\r\n\r\n", 400),
    ("bare-lf", b"GET / HTTP/1.1\nHost: echo\n\n", 400),
    ("bare-cr", b"GET / HTTP/1.1\rHost: echo\r\r", 400),
    ("no-host", b"GET / HTTP/1.1\r\n\r\n", 400),
    ("two-hosts", b"GET / HTTP/1.1\r\n" + H + H + b"\r\n", 400),
    ("host-list", b"GET / HTTP/1.1\r\nHost: a, b\r\n\r\n", 400),
    ("absolute-form-two-hosts", b"GET http://echo/ HTTP/1.1\r\n" + H + b"Host: b\r\n\r\n", 400),
    ("absolute-form-bad-host", b"GET http://echo/ HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
    ("userinfo-in-target", b"GET http://u:p@echo/ HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("asterisk-not-options", b"GET * HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("connect", b"CONNECT echo:443 HTTP/1.1\r\nHost: echo:443\r\n\r\n", 405),
    ("http-2", b"GET / HTTP/2.0\r\n" + H + b"\r\n", 505),
]


@pytest.mark.parametrize(("data", "status"), [pytest.param(d, s, id=i) for i, d, s in REFUSED])
@pytest.mark.parametrize("piece", [None, 1], ids=["one-read", "byte-by-byte"])
def test_refused(data: bytes, status: int, piece: int | None) -> None:
    assert refusal(data, piece=piece)[0] == status


def test_options_asterisk_is_accepted() -> None:
    head, _ = one(b"OPTIONS * HTTP/1.1\r\nHost: echo\r\n\r\n")
    assert (head.method, head.target) == ("OPTIONS", b"*")


@pytest.mark.parametrize("piece", [None, 1])
def test_trailing_whitespace_of_a_header_value_is_not_forwarded_and_inner_whitespace_is(piece: int | None) -> None:
    # RFC 9110 §5.5: OWS around a field value is not part of it; llhttp keeps the trailing OWS
    sink = parse(b"GET / HTTP/1.1\r\nHost: echo\r\nX-A: one two \t \r\nX-B: three\t\r\nX-C: \t\r\n"
                 b"X-D: four\r\n\r\n", piece=piece)
    assert [(n, v) for n, v in sink.heads[0].headers if n.startswith(b"x-")] == [
        (b"x-a", b"one two"), (b"x-b", b"three"), (b"x-c", b""), (b"x-d", b"four")]


def test_a_header_name_with_an_underscore_is_refused_unless_allowed() -> None:
    data = b"GET / HTTP/1.1\r\nHost: echo\r\nX_Forwarded_User: admin\r\n\r\n"
    assert refusal(data) == (400, "bad_request")
    head, _ = one(data, Limits(allow_underscores_in_headers=True))
    assert head.header(b"x_forwarded_user") == b"admin"


@pytest.mark.parametrize(("value", "kept"), [
    (b"req-123", True), (b"!~", True), (b"a" * 128, True), (b"a" * 129, False), (b"", False),
    (b"has space", False), (b"tab\there", False), (b"del\x7f", False), (b"caf\xc3\xa9", False),
    (b"line\n", False), (b"nul\x00", False), (b"\x80", False), (b" ", False),
    # hex and UUIDs, the common ids, take a shorter way; it must not let these through
    (b"7f3c9a2e5b1d4e8f9c6a2d4b8e1f0a37", True), (b"7f3c9a2e-5b1d-4e8f-9c6a-2d4b8e1f0a37", True),
    (b"---", True), (b"7f3c9a2e-5b1d 4e8f", False), (b"7f3c-\xc3\xa9", False), (b"ab-\x7f", False),
    (b"ab-\x00", False), (b"a" * 64 + b"-" * 65, False)])
def test_a_callers_request_id_is_kept_only_when_short_and_printable(value: bytes, kept: bool) -> None:
    assert is_valid_request_id(value) is kept


@pytest.mark.parametrize("value", [
    b"0", b"7", b"0012", b"1024", b"999999999999999999", b"1000000000000000000",
    b"123456789012345678901234567890", b" 42 ", b"+5", b"1_000"])
def test_a_content_length_reads_as_int_reads_it(value: bytes) -> None:
    assert content_length_value(value) == int(value)


@pytest.mark.parametrize("value", [b"", b"12a", b"-", b"0x10", b"1.5", b"\xd9\xa3"])
def test_a_content_length_int_refuses_is_refused_the_same_way(value: bytes) -> None:
    with pytest.raises(ValueError):
        int(value)
    with pytest.raises(ValueError):
        content_length_value(value)


def test_the_common_name_table_only_ever_lowers_a_name() -> None:
    # a wrong entry would turn one header into another on the way upstream
    assert _KNOWN and all(raw.lower() == name for raw, (name, _, _) in _KNOWN.items())
    # and decides what the name is as the table of special names would
    assert all(code == _SPECIAL.get(name, _PLAIN) for name, code, _ in _KNOWN.values())
    # a spelling is forwarded as received only when it is the lower-case name itself
    assert all(as_received is (raw == name) for raw, (name, _, as_received) in _KNOWN.items())
    # names found in it skip the underscore check, so none may have one
    assert not any(b"_" in raw for raw in _KNOWN)


@pytest.mark.parametrize("spelling", [b"X-Forwarded-Proto", b"x-forwarded-proto", b"X-FORWARDED-PROTO",
                                      b"x-Forwarded-proto"])
def test_a_header_name_is_recognised_in_any_spelling(spelling: bytes) -> None:
    head, _ = one(b"GET / HTTP/1.1\r\nHost: echo\r\n" + spelling + b": https\r\nAccept: */*\r\n"
                  b"ACCEPT-LANGUAGE: en\r\n\r\n")
    assert head.forwarded_proto == b"https"
    # (plain lines first, then the ones the parser read: ``message.py``)
    assert [n for n, _ in head.headers] == [b"accept", b"accept-language", b"x-forwarded-proto"]


VERSIONS = [b"1.0", b"1.1", b"2.0", b"0.9"]  # the ones llhttp reads (it refuses 3.0 itself)
CONNECTIONS = [b"", b"Connection: close\r\n", b"Connection: keep-alive\r\n",
               b"Connection: Keep-Alive, x-a\r\nX-A: 1\r\n", b"Connection: upgrade\r\nUpgrade: ws\r\n"]


@pytest.mark.parametrize("connection", CONNECTIONS)
@pytest.mark.parametrize("version", VERSIONS)
def test_the_version_is_the_request_lines_whatever_its_connection_header(version: bytes, connection: bytes) -> None:
    # A kept-alive request without Connection is taken for 1.1 without asking llhttp for the
    # version string; every other one must still be read as what its request line says.
    data = b"GET / HTTP/" + version + b"\r\nHost: echo\r\n" + connection + b"\r\n"
    if version not in (b"1.0", b"1.1"):
        assert refusal(data) == (505, "http_version_not_supported")
        return
    head, _ = one(data)
    assert head.version == version.decode()
    assert head.keep_alive is (b"close" not in connection and (version == b"1.1" or b"eep-" in connection))


@pytest.mark.parametrize("connection", CONNECTIONS[:3])
def test_a_chunked_http10_request_is_refused_whatever_its_connection_header(connection: bytes) -> None:
    data = (b"POST / HTTP/1.0\r\nHost: echo\r\n" + connection + b"Transfer-Encoding: chunked\r\n\r\n"
            b"1\r\na\r\n0\r\n\r\n")
    assert refusal(data) == (400, "bad_request")


def test_each_request_on_a_connection_gets_its_own_host() -> None:
    # the parser remembers the last Host it checked; a different one must be checked anew
    hosts = [b"Echo", b"Echo", b"b:8080", b"Echo", b"[::1]:9", b"b:8080"]
    data = b"".join(b"GET / HTTP/1.1\r\nHost: " + h + b"\r\n\r\n" for h in hosts)
    data += b"GET http://c:1/x HTTP/1.1\r\nHost: b:8080\r\n\r\nGET / HTTP/1.0\r\n\r\n"
    sink = parse(data)
    assert [(h.authority, h.host) for h in sink.heads] == [
        ("echo", "echo"), ("echo", "echo"), ("b:8080", "b"), ("echo", "echo"), ("[::1]:9", "[::1]"),
        ("b:8080", "b"), ("c:1", "c"), ("", "")]
    sink = Sink()
    parser = RequestParser(sink, Limits())
    parser.feed(b"GET / HTTP/1.1\r\nHost: echo\r\n\r\n")
    with pytest.raises(DownstreamProtocolError, match="invalid Host"):
        parser.feed(b"GET / HTTP/1.1\r\nHost: ec ho\r\n\r\n")
    assert [h.authority for h in sink.heads] == ["echo"]


def test_each_request_on_a_connection_has_its_own_method() -> None:
    """A connection's methods change from request to request (the parser remembers the last
    one it read, to know the next by identity): every head says its own."""
    methods = ["GET", "GET", "POST", "GET", "DELETE", "PROPFIND", "PROPFIND", "OPTIONS", "GET"]
    data = b"".join(b"%s /%d HTTP/1.1\r\nHost: echo\r\nContent-Length: 0\r\n\r\n" % (m.encode(), i)
                    for i, m in enumerate(methods))
    for piece in (None, 7):
        sink = parse(data, piece=piece)
        assert [h.method for h in sink.heads] == methods
        assert [h.path for h in sink.heads] == [f"/{i}" for i in range(len(methods))]


# === the order a head is forwarded in ===========================================================

ORDERED = (b"GET / HTTP/1.1\r\nHost: echo\r\nX-Request-ID: r-1\r\nAccept: a\r\nTraceparent: t\r\n"
           b"ACCEPT: b\r\nUser-Agent: u\r\naccept: c\r\nX-Forwarded-Proto: https\r\nX-Custom: 1\r\n\r\n")


@pytest.mark.parametrize("piece", [None, 1, 5])
def test_plain_lines_come_first_in_arrival_order_then_the_ones_the_parser_read(piece: int | None) -> None:
    # Both forms: a name's lines keep their order whatever their spelling (RFC 9110 §5.3:
    # the order of one name's lines is meaningful, that of different names is not)
    sink = parse(ORDERED, piece=piece)
    (head,) = sink.heads
    assert head.headers == [(b"accept", b"a"), (b"accept", b"b"), (b"user-agent", b"u"), (b"accept", b"c"),
                            (b"x-custom", b"1"), (b"x-request-id", b"r-1"), (b"traceparent", b"t"),
                            (b"x-forwarded-proto", b"https")]
    assert request_head(head, []) == (
        b"GET / HTTP/1.1\r\nhost: echo\r\naccept: a\r\naccept: b\r\nuser-agent: u\r\naccept: c\r\n"
        b"x-custom: 1\r\nx-request-id: r-1\r\ntraceparent: t\r\nx-forwarded-proto: https\r\n\r\n")


def test_removing_a_name_the_parser_reads_leaves_the_plain_lines_as_they_are() -> None:
    (head,) = parse(ORDERED).heads
    block = head.block  # the compiled form's plain lines (b"" in the pure form's)
    head.remove_headers(b"x-request-id", b"traceparent")
    assert head.block is block  # not taken apart for names never in it
    assert [name for name, _ in head.headers] == [b"accept", b"accept", b"user-agent", b"accept",
                                                  b"x-custom", b"x-forwarded-proto"]


def test_removing_a_plain_name_removes_each_of_its_lines() -> None:
    (head,) = parse(ORDERED).heads
    head.remove_headers(b"accept")
    assert head.block == b""
    assert [name for name, _ in head.headers] == [b"user-agent", b"x-custom", b"x-request-id", b"traceparent",
                                                  b"x-forwarded-proto"]
    assert b"accept" not in request_head(head, [])


def test_headers_read_by_a_filter_are_what_goes_upstream_with_its_changes() -> None:
    (head,) = parse(ORDERED).heads
    head.headers.append((b"x-pake-principal", b"alice"))  # as a filter adds one
    assert head.header(b"user-agent") == b"u" and head.header_values(b"accept") == [b"a", b"b", b"c"]
    assert request_head(head, []).endswith(b"x-forwarded-proto: https\r\nx-pake-principal: alice\r\n\r\n")
    assert request_head(head, []).count(b"accept: ") == 3  # taken apart once, not written twice


@pytest.mark.parametrize("named", [b"x-custom", b"X-Custom", b"x-custom, close"])
def test_a_plain_name_the_client_lists_in_connection_is_dropped(named: bytes) -> None:
    head, _ = one(b"GET / HTTP/1.1\r\nHost: echo\r\nX-Custom: 1\r\nAccept: a\r\nConnection: " + named
                  + b"\r\n\r\n")
    assert head.headers == [(b"accept", b"a")]


def test_connection_keep_alive_leaves_the_plain_lines_whole() -> None:
    head, _ = one(b"GET / HTTP/1.0\r\nHost: echo\r\nAccept: a\r\nConnection: keep-alive\r\n\r\n")
    assert head.headers == [(b"accept", b"a")] and head.keep_alive
