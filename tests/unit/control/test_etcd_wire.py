"""The etcd JSON gateway's wire format, without etcd: proto3 JSON (int64 as strings, zero
fields left out, base64 bytes), watch messages, and newline-delimited streams."""

from __future__ import annotations

import base64

import pytest

from control.etcd_wire import (
    Compare,
    DeleteResult,
    LineReader,
    PutOp,
    PutResult,
    RangeOp,
    RangeResult,
    StreamError,
    parse_kv,
    parse_range,
    parse_txn,
    parse_watch_response,
    prefix_end,
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


HEADER = {"cluster_id": "1", "member_id": "2", "revision": "7", "raft_term": "2"}


@pytest.mark.parametrize(("prefix", "end"), [
    (b"/pake/", b"/pake0"),
    (b"a\xff", b"b"),
    (b"a\xff\xff", b"b"),
    (b"\xff\xff", b"\x00"),  # nothing to increment: to the end of the keyspace
    (b"", b"\x00"),
])
def test_prefix_end_covers_exactly_the_prefix(prefix: bytes, end: bytes) -> None:
    assert prefix_end(prefix) == end


def test_a_kv_with_zero_fields_left_out_decodes_to_zeros() -> None:
    kv = parse_kv({"key": b64(b"/pake/k"), "mod_revision": "9"})  # a delete event's kv
    assert (kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease) == (
        b"/pake/k", b"", 0, 9, 0, 0)


def test_range_response_decodes_int64_strings_and_base64() -> None:
    result = parse_range({"header": HEADER, "count": "1", "kvs": [
        {"key": b64(b"k"), "value": b64(b"\x00\xffbinary"), "create_revision": "3", "mod_revision": "5",
         "version": "2", "lease": "4027522330590990343"}]})
    assert result.revision == 7 and result.count == 1 and not result.more
    assert result.kvs[0].value == b"\x00\xffbinary" and result.kvs[0].lease == 4027522330590990343


def test_an_empty_range_has_no_kvs_field() -> None:
    assert parse_range({"header": HEADER}) == RangeResult(revision=7, kvs=(), more=False, count=0)


@pytest.mark.parametrize("bad", [
    {"header": HEADER, "kvs": [{"key": "not base64!"}]},
    {"header": HEADER, "kvs": [{"key": b64(b"k"), "mod_revision": "seven"}]},
    {"header": "not an object"},
    ["not", "an", "object"],
])
def test_malformed_answers_are_value_errors_not_crashes(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_range(bad)


def test_a_failed_txn_omits_succeeded_and_carries_the_failure_read() -> None:
    result = parse_txn({"header": HEADER, "responses": [
        {"response_range": {"header": {"revision": "7"}, "count": "1",
                            "kvs": [{"key": b64(b"k"), "mod_revision": "6"}]}}]})
    assert not result.succeeded and result.revision == 7
    assert isinstance(result.responses[0], RangeResult) and result.responses[0].kvs[0].mod_revision == 6


def test_a_successful_txn_lists_each_operation_result() -> None:
    result = parse_txn({"header": HEADER, "succeeded": True, "responses": [
        {"response_put": {"header": {"revision": "8"}}},
        {"response_delete_range": {"header": {"revision": "8"}, "deleted": "1"}},
        {"response_delete_range": {"header": {"revision": "8"}}}]})
    assert result.succeeded
    assert result.responses == (PutResult(8), DeleteResult(8, 1), DeleteResult(8, 0))


def test_compares_and_ops_encode_as_the_gateway_expects() -> None:
    assert Compare(b"k", "CREATE", 0).to_json() == {
        "key": b64(b"k"), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
    assert Compare(b"k", "MOD", 12).to_json()["mod_revision"] == "12"
    assert PutOp(b"k", b"v", lease=5).to_json() == {"request_put": {"key": b64(b"k"), "value": b64(b"v"),
                                                                    "lease": "5"}}
    assert PutOp(b"k", b"v").to_json() == {"request_put": {"key": b64(b"k"), "value": b64(b"v")}}
    assert RangeOp(b"a", b"b").to_json() == {"request_range": {"key": b64(b"a"), "range_end": b64(b"b")}}


def test_watch_messages_are_classified() -> None:
    created = parse_watch_response({"result": {"header": HEADER, "created": True}})
    assert created.created and not created.is_progress and created.revision == 7

    events = parse_watch_response({"result": {"header": HEADER, "events": [
        {"kv": {"key": b64(b"a"), "value": b64(b"1"), "mod_revision": "6"}},
        {"type": "DELETE", "kv": {"key": b64(b"a"), "mod_revision": "7"}}]}})
    assert [(e.kind, e.kv.value, e.kv.mod_revision) for e in events.events] == [("put", b"1", 6), ("delete", b"", 7)]
    assert not events.is_progress

    compacted = parse_watch_response({"result": {"header": {"raft_term": "2"}, "canceled": True,
                                                 "compact_revision": "3"}})
    assert compacted.canceled and compacted.compact_revision == 3


def test_only_a_per_watch_notification_counts_as_progress() -> None:
    # etcd 3.4 answers a progress_request stream-wide (watch_id -1) even while the watcher is
    # still replaying older events, so that answer must not move the resume revision
    assert parse_watch_response({"result": {"header": HEADER}}).is_progress
    assert not parse_watch_response({"result": {"header": HEADER, "watch_id": "-1"}}).is_progress


def test_a_stream_error_message_is_a_stream_error() -> None:
    with pytest.raises(StreamError, match=r"transport is closing \(grpc code 14\)"):
        parse_watch_response({"error": {"grpc_code": 14, "http_code": 503, "message": "transport is closing"}})


class Chunks:
    """A streamed body that arrives in the given pieces."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = list(chunks)

    async def readany(self) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""


async def test_line_reader_joins_split_lines_and_splits_joined_ones() -> None:
    reader = LineReader(Chunks(b'{"a":', b'1}\n{"b":2}\n{"c"', b":3}\n"), max_line=100)
    assert [await reader.next() for _ in range(4)] == [b'{"a":1}', b'{"b":2}', b'{"c":3}', None]


async def test_line_reader_returns_a_last_message_without_newline() -> None:
    # the gateway ends a stream with an error message and no newline when etcd shuts down
    reader = LineReader(Chunks(b'{"result":{}}\n', b'{"error":{}}'), max_line=100)
    assert [await reader.next() for _ in range(3)] == [b'{"result":{}}', b'{"error":{}}', None]


async def test_line_reader_bounds_a_message() -> None:
    reader = LineReader(Chunks(b"x" * 60, b"x" * 60, b"\n"), max_line=100)
    with pytest.raises(ValueError, match="longer than 100 bytes"):
        await reader.next()
