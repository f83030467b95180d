"""Log lines' JSON strings: a repeated value is quoted once, exactly as json.dumps quotes it,
and the cache stays bounded whatever a client sends."""

from __future__ import annotations

import json

import pytest

from sidecar.config.model import Limits
from sidecar.errors import DownstreamProtocolError
from sidecar.exchange import Exchange
from sidecar.http.message import RequestHead
from sidecar.http.request_parser import RequestParser
from sidecar.observability.json_text import (DECIMALS, NumberField, QuoteCache, int_text, path_text, printable_text,
                                             request_id_text, trace_ids)


def test_a_cached_value_is_quoted_as_json_dumps_quotes_it_every_time() -> None:
    cache = QuoteCache()
    hostile = ['orders:8080', 'a"b', 'back\\slash', 'new\nline', 'tab\t', 'é€😀', '\x00\x1f', '']
    for _ in range(2):  # the second round comes from the cache
        assert [cache.get(v) for v in hostile] == [json.dumps(v) for v in hostile]
    assert cache.get_or_null(None) == "null" and cache.get_or_null('a"b') == '"a\\"b"'


def test_the_cache_is_bounded_in_entries_and_in_what_it_keeps() -> None:
    cache = QuoteCache(limit=100)
    for i in range(1000):  # a client sending a new authority with every request
        assert cache.get(f"host-{i}:80") == f'"host-{i}:80"'
        assert len(cache) <= 100
    cache = QuoteCache()
    long_value = "x" * 10_000
    assert cache.get(long_value) == f'"{long_value}"' and len(cache) == 0  # quoted, not kept


def test_small_and_large_numbers_read_as_str_writes_them() -> None:
    for n in (0, 1, 9, 10, 200, 999, 1000, 1001, 65_536, 10**12, -1, -1000):
        assert int_text(n) == str(n)


def test_a_request_id_with_a_quote_or_a_backslash_is_escaped_and_others_are_kept_as_they_are() -> None:
    for rid in ("4bf92f3577b34da6a3ce929d0e0e4736", "3f2a9c1e-1b7d-4b8e", 'a"b', "c\\d", '\\"', "~!#$%&'()*+"):
        assert json.loads(f'"{printable_text(rid)}"') == rid
    assert printable_text('a"b\\c') == 'a\\"b\\\\c'


def exchange_of(path: str, request_id: str = "r1") -> Exchange:
    head = RequestHead(method="GET", target=path.encode(), path=path, authority="orders:8080",
                       host="orders", version="1.1", headers=[])
    return Exchange(request=head, listener="inbound", downstream_address="10.0.0.7", request_id=request_id,
                    start=0.0)


def test_an_exchange_s_path_and_request_id_are_quoted_once_for_all_its_log_lines() -> None:
    ex = exchange_of('/o/"q"\\é', request_id='a"b')
    text = path_text(ex)
    assert json.loads(f'"{text}"') == '/o/"q"\\é' and f'"{text}"' == json.dumps('/o/"q"\\é')
    assert path_text(ex) is text  # the audit record's and the access line's one text
    rid = request_id_text(ex)
    assert json.loads(f'"{rid}"') == 'a"b' and request_id_text(ex) is rid


def test_a_path_with_nothing_to_escape_is_written_as_it_is() -> None:
    ex = exchange_of("/api/v1/orders/12345;v=2,x~y!$&'()*+=:@%41")
    assert path_text(ex) is ex.request.path


class _Heads:
    def __init__(self) -> None:
        self.paths: list[str] = []

    def on_request(self, head: RequestHead) -> None:
        self.paths.append(head.path)

    def on_body(self, chunk: bytes) -> None:
        pass

    def on_request_end(self) -> None:
        pass


@pytest.mark.parametrize("byte", [*range(0x21), 0x7F, 0x80, 0xC3, 0xFF])
def test_a_parsed_path_is_printable_ascii_which_path_text_relies_on(byte: int) -> None:
    """``path_text`` escapes only a quote and a backslash in an ASCII path: the parsers
    (the wire's and httptools', both run by CI) refuse a target with a control character, a
    space or a byte past 0x7e, so no path they give needs more. A space ends the target, so
    it gives a 400 too (the request line has then too many parts)."""
    heads = _Heads()
    parser = RequestParser(heads, Limits())
    with pytest.raises(DownstreamProtocolError):
        parser.feed(b"GET /a" + bytes([byte]) + b"b HTTP/1.1\r\nHost: x\r\n\r\n")
    assert heads.paths == []


def test_a_prefixed_cache_keeps_whole_fragments_and_stays_bounded() -> None:
    cache = QuoteCache(limit=10, prefix=',"peer":')
    for _ in range(2):
        assert cache.get('spiffe://pake.local/service/"web"') == ',"peer":"spiffe://pake.local/service/\\"web\\""'
    for i in range(100):
        assert cache.get(f"p{i}") == f',"peer":"p{i}"' and len(cache) <= 10


def test_fragments_read_as_the_json_of_their_fields() -> None:
    """A number in or out of its table, trace ids present or null, three decimals."""
    status = NumberField("status", 600)
    for n in (0, 99, 100, 200, 404, 599, 600, 999, 1000, 10**12, -1):
        assert json.loads("{" + status.text(n)[1:] + "}") == {"status": n}
    for trace_id, span_id in (("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"), (None, None),
                              ("", ""), ("4bf92f3577b34da6a3ce929d0e0e4736", None)):
        assert json.loads("{" + trace_ids(trace_id, span_id)[1:] + "}") == {
            "trace_id": trace_id or None, "span_id": span_id or None}
    assert [float("1" + DECIMALS[i]) for i in (0, 7, 42, 999)] == [1.0, 1.007, 1.042, 1.999]
