"""The compiled form's HTTP wire in C (sidecar/http/_wire.c) against what it replaces.

Its parser against httptools' parsers: for any bytes, however they arrive in reads, both
drive the same llhttp and must call a protocol the same way: the same callbacks in the same
order with the same bytes, each head's header lines the same pairs and its target or reason
the same bytes (the binding's as the arguments of ``on_headers_complete``, httptools' as
``on_header``, ``on_url`` and ``on_status`` calls before it; a request's values without
trailing OWS, as ``RequestParser.on_header`` makes them; the binding's plain lines as its
block, taken apart and put first, as ``RequestHead.headers`` does: httptools' lines of names
not among SPECIAL, in any case, without an underscore, are put first and, in a request,
lower-cased to compare), and the same errors,
messages, causes and upgrade offsets. The framing tests of the request and response parsers
then hold for both, since the parsers' own code is the same either way.

Its ``head`` against the writer's join of a head's pieces: the same bytes for any pieces.

Runs where the compiled form is built; skipped in the pure-Python run.
"""

from __future__ import annotations

from typing import Any

import httptools
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from sidecar.http.headers import REQUEST_SPECIAL
from sidecar.http.message import block_pairs
from sidecar.http.request_parser import head_ends
from sidecar.http.writer import header_line

from .settings import fuzz_settings
from .strategies import reads, splits_of
from .test_request_head import requests
from .test_response_parser import responses

_wire = pytest.importorskip("sidecar.http._wire", reason="the HTTP wire's C helpers are built with the compiled form")
Parser: Any = _wire.Parser


class Boom(Exception):
    pass


class Recorder:
    """Every callback, as an event; ``fail_at``: raise Boom on that event (a protocol error)."""

    def __init__(self, *, strip: bool, fail_at: int = -1) -> None:
        self.strip = strip
        self.fail_at = fail_at
        self.events: list[tuple[object, ...]] = []
        self.lines: list[tuple[bytes, bytes]] = []
        self.start = b""
        self.in_head = False
        self.coded: list[tuple[bytes, int]] = []  # each line's name and its code (the binding's)
        self.plain_first = False  # (httptools') put the lines the binding puts in its block first
        self.blocks: list[bytes] = []  # (the binding's)

    def _event(self, *event: object) -> None:
        self.events.append(event)
        if len(self.events) == self.fail_at:
            raise Boom(f"at event {self.fail_at}")

    def on_message_begin(self) -> None:
        self.lines = []
        self.start = b""
        self.in_head = True
        self._event("begin")

    def on_url(self, url: bytes) -> None:  # httptools a piece; the binding past max_start only
        self.start += url

    def on_status(self, reason: bytes) -> None:
        self.start += reason

    def on_header(self, name: bytes, value: bytes) -> None:  # httptools only
        if self.in_head:
            self.lines.append((name, value.rstrip(b" \t") if self.strip else value))

    def on_headers_complete(self, headers: list[tuple[bytes, bytes]] | None = None,
                            start: bytes | None = None, codes: bytes | None = None,
                            block: bytes = b"", block_lines: int = 0) -> None:
        self.in_head = False
        if codes is not None:
            assert headers is not None and len(codes) == len(headers)
            self.coded += [(name, code) for (name, _), code in zip(headers, codes)]
        if headers is None:
            lines = self.lines
            if self.plain_first:  # httptools: its lines in the binding's order
                plain = [(n.lower() if self.strip else n, v) for n, v in lines if _plain(n)]
                lines = plain + [(n, v) for n, v in lines if not _plain(n)]
        else:
            assert block.count(b"\r\n") == block_lines
            lines = block_pairs(block) + headers
            self.blocks.append(block)
        self._event("head", self.start if start is None else start, lines)

    def on_body(self, body: bytes) -> None:
        self._event("body", body)

    def on_chunk_header(self) -> None:
        self._event("chunk")

    def on_message_complete(self) -> None:
        self.in_head = False
        self._event("end")


# the names a binding given them never puts in its block (a request parser's: the strategies
# draw several of them)
SPECIAL = tuple(sorted(REQUEST_SPECIAL))


def _plain(name: bytes) -> bool:
    """A line of this name is in the block of a binding given SPECIAL."""
    return name.lower() not in REQUEST_SPECIAL and b"_" not in name


def run(parser: Any, recorder: Recorder, pieces: list[bytes], response: bool) -> list[object]:
    """What each read did: the events and the state the parser reports after it, or the
    error it raised (its class, message, and the class of its cause)."""
    out: list[object] = []
    for piece in pieces:
        try:
            parser.feed_data(piece)
        except httptools.HttpParserUpgrade as exc:
            out.append(("upgrade", exc.args, recorder.events))
            return out
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            out.append((type(exc).__name__, str(exc), type(cause).__name__, str(cause), recorder.events))
            return out
        state = (parser.get_status_code() if response else parser.get_method(),
                 parser.should_keep_alive(), parser.should_upgrade(), parser.get_http_version())
        out.append((list(recorder.events), state))
    return out


# names the parser gives as these objects: some the strategies draw, a prefix of one (a name
# that arrives in two reads may begin as one), and one no head has
KNOWN = (b"Host", b"host", b"Content-Length", b"transfer-encoding", b"Transfer-Encoding", b"X-A",
         b"Con", b"never-sent")


def both(pieces: list[bytes], *, response: bool, fail_at: int = -1) -> tuple[list[object], list[object]]:
    ours, theirs = Recorder(strip=not response, fail_at=fail_at), Recorder(strip=not response, fail_at=fail_at)
    theirs.plain_first = True
    binding = Parser(ours, response, 10_000, not response, _wire.Names(KNOWN), 0, _wire.Names(SPECIAL),
                     not response)
    reference = httptools.HttpResponseParser(theirs) if response else httptools.HttpRequestParser(theirs)
    results = run(binding, ours, pieces, response), run(reference, theirs, pieces, response)
    for name, code in ours.coded:  # a line's code is its name's place in KNOWN, when it is that object
        assert code == next((i + 1 for i, known in enumerate(KNOWN) if name is known), 0), (name, code)
    return results


@fuzz_settings(300)
@given(requests(), reads(), st.integers(-1, 12))
@example(b"GET / HTTP/1.1\r\nX-Empty:\r\nX-Sp:   \r\nHost: a \t\r\n\r\n", [20, 21], -1)
@example(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nTr: x\r\n\r\n"
         b"GET / HTTP/1.1\r\nHost: b\r\n\r\n", [60, 75], -1)
@example(b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nHELLO", [3], -1)
@example(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n", [], 3)
def test_requests_reach_the_protocol_as_through_httptools(data: bytes, cuts: list[int], fail_at: int) -> None:
    for pieces in ([data], splits_of(data, cuts)):
        ours, theirs = both(pieces, response=False, fail_at=fail_at)
        assert ours == theirs, pieces


@fuzz_settings(300)
@given(responses(), reads(), st.integers(-1, 10))
@example(b"HTTP/1.1 200 OK\r\nA: 1 \r\nB:\t2\t\r\nContent-Length: 2\r\n\r\nhi", [20], -1)
@example(b"HTTP/1.1 100 Continue\r\nX-I: 1\r\n\r\nHTTP/1.1 204 No\r\nX-F: 2\r\n\r\n", [30, 31, 32], -1)
@example(b"HTTP/1.1 101 Switching\r\nUpgrade: ws\r\nConnection: upgrade\r\n\r\nframes", [], -1)
def test_responses_reach_the_protocol_as_through_httptools(data: bytes, cuts: list[int], fail_at: int) -> None:
    for pieces in ([data], splits_of(data, cuts)):
        ours, theirs = both(pieces, response=True, fail_at=fail_at)
        assert ours == theirs, pieces


# llhttp built with SSE4.2 checks a header value 16 bytes a step (a range compare), httptools'
# build a byte a step: values longer than a step, with any byte anywhere in them
_VALUE_RUN = st.lists(st.sampled_from([9, *range(0x20, 0x7F), *range(0x80, 0x100)]), min_size=0, max_size=70)


@st.composite
def long_values(draw: st.DrawFn) -> bytes:
    value = bytearray(draw(_VALUE_RUN))
    for _ in range(draw(st.integers(0, 2))):  # a byte of any value, at any offset from a step
        value.insert(draw(st.integers(0, len(value))), draw(st.integers(0, 255)))
    return bytes(value)


@fuzz_settings(300)
@given(st.lists(long_values(), min_size=1, max_size=4), reads(), st.booleans())
@example([b"a" * 15 + b"\x7f" + b"b" * 20], [], False)
@example([b"a" * 16 + b"\x00" + b"b" * 20], [], True)
@example([b"\t" * 31 + b"\x80\xff" + b" " * 16], [17], False)
def test_long_header_values_of_any_bytes_reach_the_protocol_as_through_httptools(
        values: list[bytes], cuts: list[int], response: bool) -> None:
    start = b"HTTP/1.1 200 OK\r\n" if response else b"GET / HTTP/1.1\r\nHost: a\r\n"
    data = start + b"".join(b"X-V%d: %s\r\n" % (i, v) for i, v in enumerate(values)) + b"\r\n"
    for pieces in ([data], splits_of(data, cuts)):
        ours, theirs = both(pieces, response=response)
        assert ours == theirs, pieces


def test_a_head_past_max_headers_keeps_that_many_lines_and_no_more() -> None:
    # what bounds the memory a head of many tiny lines takes while it is parsed: the caller's
    # limit plus one, whatever the head holds (the parser then refuses it with a 431 or 502)
    recorder = Recorder(strip=True)
    parser = Parser(recorder, False, 5, True)
    parser.feed_data(b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: %d\r\n" % (i, i) for i in range(5000)) + b"\r\n")
    heads = [event[2] for event in recorder.events if event[0] == "head"]
    assert heads == [[(b"X-%d" % i, b"%d" % i) for i in range(5)]]


def test_head_lines_counts_the_whole_lines_of_the_head_being_read() -> None:
    parser = Parser(Recorder(strip=True), False, 100, True)
    parser.feed_data(b"GET /" + b"a" * 100)
    assert parser.head_lines() == 0  # still the request line
    parser.feed_data(b" HTTP/1.1\r\nHost: a\r\nX-Long: " + b"b" * 100)
    assert parser.head_lines() == 1  # Host; X-Long is not whole yet
    parser.feed_data(b"\r\nX-Next: c")
    assert parser.head_lines() == 2
    parser.feed_data(b"\r\n\r\n")
    assert parser.head_lines() == 0  # the head is over


def test_a_known_name_is_the_object_given_and_any_other_a_new_one() -> None:
    names = _wire.Names(KNOWN)
    recorder = Recorder(strip=True)
    parser = Parser(recorder, False, 100, True, names)
    parser.feed_data(b"GET / HTTP/1.1\r\nHost: a\r\nX-B: 1\r\nCon")
    parser.feed_data(b"tent-Length: 0\r\n\r\n")
    (pairs,) = [event[2] for event in recorder.events if event[0] == "head"]
    assert pairs == [(b"Host", b"a"), (b"X-B", b"1"), (b"Content-Length", b"0")]
    assert pairs[0][0] is KNOWN[0]
    assert all(name is not known for name, _ in pairs[1:] for known in KNOWN)  # "Con" grew: a new object
    assert recorder.coded == [(b"Host", 1), (b"X-B", 0), (b"Content-Length", 0)]  # and has no code


def test_a_known_name_s_code_is_its_place_plus_one_for_the_first_255_names() -> None:
    known = tuple(b"x-%d" % i for i in range(300))
    recorder = Recorder(strip=True)
    parser = Parser(recorder, False, 100, True, _wire.Names(known))
    parser.feed_data(b"GET / HTTP/1.1\r\nx-0: a\r\nx-254: b\r\nx-255: c\r\nx-299: d\r\nx-300: e\r\n\r\n")
    assert recorder.coded == [(b"x-0", 1), (b"x-254", 255), (b"x-255", 0), (b"x-299", 0), (b"x-300", 0)]
    (pairs,) = [event[2] for event in recorder.events if event[0] == "head"]
    assert [name is known[i] for (name, _), i in zip(pairs, (0, 254, 255, 299))] == [True] * 4


def test_a_head_longer_than_the_parsers_own_room_keeps_every_pair_and_code() -> None:
    # past the 24 pairs kept in the parser itself, the pairs and their codes move to memory
    # of their own, and grow together
    known = tuple(b"x-%d" % i for i in range(100))
    recorder = Recorder(strip=True)
    parser = Parser(recorder, False, 1000, True, _wire.Names(known))
    lines = [(b"x-%d" % i if i % 3 else b"y-%d" % i, b"%d" % i) for i in range(100)]
    parser.feed_data(b"GET / HTTP/1.1\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in lines) + b"\r\n")
    (pairs,) = [event[2] for event in recorder.events if event[0] == "head"]
    assert pairs == lines
    assert recorder.coded == [(n, int(n[2:]) + 1 if n[:1] == b"x" else 0) for n, _ in lines]


@pytest.mark.parametrize("bad", [(b"",), (b"x" * 65,), ("host",), [b"host"]])
def test_names_are_a_tuple_of_short_bytes(bad: Any) -> None:
    with pytest.raises((TypeError, ValueError), match="Names"):
        _wire.Names(bad)


class Bounded(Recorder):
    """RequestParser.on_url's rule: a target past 10 bytes is refused."""

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.start) > 10:
            raise Boom(f"target of {len(self.start)} bytes")


def test_a_target_past_max_start_goes_to_on_url_at_once_whole_so_far() -> None:
    recorder = Bounded(strip=True)
    parser = Parser(recorder, False, 100, True, None, 10)
    parser.feed_data(b"GET /0123")  # within the bound: gathered, no call yet
    assert recorder.start == b""
    with pytest.raises(httptools.HttpParserCallbackError) as caught:
        parser.feed_data(b"456789")  # the head is far from whole: refused now, not at its end
    assert isinstance(caught.value.__context__, Boom) and recorder.start == b"/0123456789"


class Counting(Recorder):
    def __init__(self) -> None:
        super().__init__(strip=True)
        self.urls: list[bytes] = []
        self.starts: list[bytes | None] = []

    def on_url(self, url: bytes) -> None:
        self.urls.append(url)
        super().on_url(url)

    def on_headers_complete(self, headers: list[tuple[bytes, bytes]] | None = None,
                            start: bytes | None = None, codes: bytes | None = None,
                            block: bytes = b"", block_lines: int = 0) -> None:
        self.starts.append(start)
        super().on_headers_complete(headers, start, codes, block, block_lines)


def test_a_target_within_max_start_comes_with_the_head_and_one_past_it_does_not() -> None:
    recorder = Counting()  # takes the long target: its head then comes without it
    parser = Parser(recorder, False, 100, True, None, 10)
    parser.feed_data(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\nGET /0123")
    parser.feed_data(b"456789/more HTTP/1.1\r\nHost: a\r\n\r\n")
    assert recorder.starts == [b"/ok", None]
    assert recorder.urls == [b"/0123456789/more"]  # once: all it had when past the bound, no more after


class Reentrant(Recorder):
    parser: Any = None

    def on_headers_complete(self, headers: list[tuple[bytes, bytes]] | None = None,
                            start: bytes | None = None, codes: bytes | None = None,
                            block: bytes = b"", block_lines: int = 0) -> None:
        self.parser.feed_data(b"GET /again HTTP/1.1\r\n\r\n")


def test_a_feed_from_inside_a_feed_is_refused_not_parsed_under_it() -> None:
    # llhttp's state and the head's pairs belong to the feed that runs (a callback, or a
    # finalizer run by an allocation's garbage collection, could otherwise change them)
    recorder = Reentrant(strip=True)
    recorder.parser = Parser(recorder, False, 100, True)
    with pytest.raises(httptools.HttpParserCallbackError) as caught:
        recorder.parser.feed_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert isinstance(caught.value.__context__, RuntimeError)
    assert "while it parses" in str(caught.value.__context__)


class Half:
    """A protocol whose third callback cannot be looked up."""

    def __getattr__(self, name: str) -> Any:
        if name == "on_status":
            raise KeyError(name)
        raise AttributeError(name)


def test_an_init_that_failed_half_way_leaves_nothing_held_and_can_be_retried() -> None:
    import sys

    names = _wire.Names(KNOWN)
    parser = Parser.__new__(Parser)
    before = sys.getrefcount(names)
    for _ in range(100):
        with pytest.raises(KeyError):
            parser.__init__(Half(), False, 10, True, names)
    assert sys.getrefcount(names) <= before + 1  # the last try's, released by the next init
    recorder = Recorder(strip=True)
    parser.__init__(recorder, False, 10, True, names)
    parser.feed_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert [event[0] for event in recorder.events] == ["begin", "head", "end"]


def test_a_parser_is_initialised_once() -> None:
    parser = Parser(Recorder(strip=True), False, 10, True)
    with pytest.raises(RuntimeError):
        parser.__init__(Recorder(strip=True), True, 10, False)
    with pytest.raises(RuntimeError, match="__init__"):  # and never parses uninitialised
        Parser.__new__(Parser).feed_data(b"GET / HTTP/1.1\r\n\r\n")


@fuzz_settings(200)
@given(st.lists(st.tuples(st.binary(max_size=20), st.binary(max_size=40)), max_size=30),
       st.lists(st.binary(max_size=30), max_size=8), st.binary(max_size=4), st.lists(st.binary(max_size=30), max_size=6))
def test_a_head_is_its_parts_the_lines_header_line_makes_the_extra_lines_and_the_tail(
        pairs: list[tuple[bytes, bytes]], extra: list[bytes], tail: bytes, parts: list[bytes]) -> None:
    expected = b"".join([*parts, *(header_line(name, value) for name, value in pairs), *extra, tail])
    assert _wire.head(pairs, extra, tail, *parts) == expected


@pytest.mark.parametrize("args", [
    ([(b"a", b"b")],), ((), [], b""), ([], (), b""), ([], [], ""), ([(b"a", b"b", b"c")], [], b""),
    ([(b"a", "b")], [], b""), ([[b"a", b"b"]], [], b""), ([], ["x"], b""), ([], [], b"", b"ok", "no")])
def test_head_refuses_anything_but_byte_pairs_lines_and_parts(args: tuple[Any, ...]) -> None:
    with pytest.raises(TypeError, match="head"):
        _wire.head(*args)


@fuzz_settings(300)
@given(st.binary(max_size=60).map(lambda b: b.replace(b"a", b"\r\n")), st.integers(0, 70),
       st.integers(0, 70), st.integers(1, 5))
@example(b"\n\r\n\r\n\r\n", 0, 7, 3)
@example(b"\n\r\n\r\nX", 0, 6, 2)  # overlapping ends: fewer than two newlines a head, so none
@example(b"\n\r\n\r\n\r\nX", 0, 8, 3)
@example(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\n\r", 0, 44, 2)
def test_head_ends_finds_what_the_python_scan_finds(buf: bytes, at: int, end: int, heads: int) -> None:
    end = min(end, len(buf))
    at = min(at, end)
    assert _wire.head_ends(buf, at, end, heads) == head_ends(buf, at, end, heads)


@pytest.mark.parametrize("args", [(b"ab", 0, 3, 1), (b"ab", 2, 1, 1), (b"ab", -1, 2, 1), (b"ab", 0, 2, 0)])
def test_head_ends_refuses_a_range_outside_the_bytes(args: tuple[bytes, int, int, int]) -> None:
    with pytest.raises(ValueError, match="head_ends"):
        _wire.head_ends(*args)


@fuzz_settings(200)
@given(st.binary(max_size=140))
@example(b"7f3c9a2e-5b1d-4e8f-9c6a-2d4b8e1f0a37")
@example(b"!~")
@example(b"a b")
@example(b"a\x7f")
@example(b"\x80")
def test_visible_is_every_byte_between_0x21_and_0x7e(value: bytes) -> None:
    assert _wire.visible(value) is all(0x21 <= c <= 0x7E for c in value)


# --- the block -------------------------------------------------------------------------------

def _head_of(recorder: Recorder) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The last head's block and its pairs (not taken apart)."""
    (block,) = recorder.blocks[-1:]
    (lines,) = [event[2] for event in recorder.events if event[0] == "head"][-1:]
    return block, lines[len(block_pairs(block)):]


REQUEST_HEAD = (b"GET / HTTP/1.1\r\nHost: a\r\nUser-Agent: x \t\r\nACCEPT:\r\nX-Weird: a: b\r\n"
                b"X-Request-Id: 1\r\nx_u: 2\r\nConnection: keep-alive\r\naccept: c\r\n\r\n")


@pytest.mark.parametrize("size", [len(REQUEST_HEAD), 1, 7])
def test_a_request_s_plain_lines_are_its_block_as_the_writer_writes_them(size: int) -> None:
    # a name not among the special ones, in any case, and without an underscore: lower-cased,
    # the value without trailing OWS, in arrival order, however the head arrives in reads
    recorder = Recorder(strip=True)
    parser = Parser(recorder, False, 100, True, _wire.Names(KNOWN), 0, _wire.Names(SPECIAL), True)
    for at in range(0, len(REQUEST_HEAD), size):
        parser.feed_data(REQUEST_HEAD[at:at + size])
    block, pairs = _head_of(recorder)
    assert block == b"user-agent: x\r\naccept: \r\nx-weird: a: b\r\naccept: c\r\n"
    assert pairs == [(b"Host", b"a"), (b"X-Request-Id", b"1"), (b"x_u", b"2"), (b"Connection", b"keep-alive")]


def test_a_response_s_plain_lines_are_its_block_as_received() -> None:
    recorder = Recorder(strip=False)
    parser = Parser(recorder, True, 100, False, _wire.Names(KNOWN), 0, _wire.Names(SPECIAL), False)
    parser.feed_data(b"HTTP/1.1 200 OK\r\nContent-Type: a/b \r\nX-Request-ID: r\r\nX-A:\t1\r\n"
                     b"Content-Length: 0\r\n\r\n")
    block, pairs = _head_of(recorder)
    assert block == b"Content-Type: a/b \r\nX-A: 1\r\n"  # (llhttp drops leading OWS itself)
    assert pairs == [(b"X-Request-ID", b"r"), (b"Content-Length", b"0")]


def test_max_headers_counts_the_block_s_lines_too() -> None:
    # the memory a head of many plain lines takes is bounded as the pairs' is
    recorder = Recorder(strip=True)
    parser = Parser(recorder, False, 5, True, None, 0, _wire.Names(SPECIAL), True)
    parser.feed_data(b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: %d\r\n" % (i, i) for i in range(5000))
                     + b"\r\n")
    block, pairs = _head_of(recorder)
    assert pairs == [(b"Host", b"a")]
    assert block == b"".join(b"x-%d: %d\r\n" % (i, i) for i in range(4))
    parser.feed_data(b"GET / HTTP/1.1\r\nX-1: a\r\nX-2: b")
    assert parser.head_lines() == 1  # X-2 is not whole yet
    parser.feed_data(b"\r\nX-3")
    assert parser.head_lines() == 2


def test_a_long_block_leaves_nothing_behind_for_the_next_head() -> None:
    # the buffer of a long block is freed with its head; the next head's block is its own
    recorder = Recorder(strip=True)
    parser = Parser(recorder, False, 10_000, True, None, 0, _wire.Names(SPECIAL), True)
    long_lines = b"".join(b"x-%d: %s\r\n" % (i, b"v" * 500) for i in range(100))
    parser.feed_data(b"GET / HTTP/1.1\r\n" + long_lines + b"\r\nGET / HTTP/1.1\r\nX-B: 1\r\n\r\n"
                     + b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert recorder.blocks == [long_lines, b"x-b: 1\r\n", b""]
