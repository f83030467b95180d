"""etcd v3's JSON gateway wire format: typed values, request parts, and pure parsing.

Pure: no I/O (``LineReader`` reads from whatever it is given). The gateway speaks proto3
JSON: keys and values are base64, int64 fields are strings, and zero-valued fields are left
out; the ``parse_*`` functions turn that into the dataclasses below and raise ``ValueError``
on anything else, which the client reports as a ``StoreError``.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

__all__ = [
    "Compare",
    "DeleteOp",
    "DeleteResult",
    "EtcdEvent",
    "KeyValue",
    "Lease",
    "LineReader",
    "Op",
    "PutOp",
    "PutResult",
    "RangeOp",
    "RangeResult",
    "StreamError",
    "TxnResult",
    "WatchResponse",
    "as_int",
    "as_mapping",
    "error_text",
    "header_revision",
    "parse_kv",
    "parse_range",
    "parse_txn",
    "parse_watch_response",
    "prefix_end",
    "put_body",
    "range_body",
]


# --------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


@dataclass(frozen=True, slots=True)
class RangeResult:
    revision: int  # the store's revision when the range was read
    kvs: tuple[KeyValue, ...]
    more: bool  # a limit cut the answer short
    count: int


@dataclass(frozen=True, slots=True)
class PutResult:
    revision: int


@dataclass(frozen=True, slots=True)
class DeleteResult:
    revision: int
    deleted: int


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int
    responses: tuple[RangeResult | PutResult | DeleteResult, ...]


@dataclass(frozen=True, slots=True)
class Lease:
    id: int
    ttl: int  # seconds, as granted by the server


@dataclass(frozen=True, slots=True)
class EtcdEvent:
    kind: Literal["put", "delete"]
    kv: KeyValue  # for a delete: key and mod_revision (the delete's revision) only


@dataclass(frozen=True, slots=True)
class WatchResponse:
    """One message of the watch stream, classified."""

    revision: int  # header revision (0 when the gateway left it out, e.g. on a cancel)
    watch_id: int  # -1: a stream-wide progress answer
    created: bool
    canceled: bool
    compact_revision: int
    cancel_reason: str
    events: tuple[EtcdEvent, ...]

    @property
    def is_progress(self) -> bool:
        """A per-watch progress notification: every event up to ``revision`` was sent.

        etcd 3.4 answers a ``progress_request`` stream-wide (``watch_id`` -1) even for a
        watcher still catching up, so only the server's own notifications count."""
        return not (self.created or self.canceled or self.events) and self.watch_id >= 0 and self.revision > 0


# ------------------------------------------------------------------- request parts


@dataclass(frozen=True, slots=True)
class Compare:
    key: bytes
    target: Literal["VERSION", "CREATE", "MOD", "VALUE", "LEASE"]
    value: int | bytes
    result: Literal["EQUAL", "GREATER", "LESS", "NOT_EQUAL"] = "EQUAL"

    def to_json(self) -> dict[str, Any]:
        field = {"VERSION": "version", "CREATE": "create_revision", "MOD": "mod_revision",
                 "VALUE": "value", "LEASE": "lease"}[self.target]
        value = _b64(self.value) if isinstance(self.value, bytes) else str(self.value)
        return {"key": _b64(self.key), "target": self.target, "result": self.result, field: value}


@dataclass(frozen=True, slots=True)
class RangeOp:
    key: bytes
    range_end: bytes = b""

    def to_json(self) -> dict[str, Any]:
        return {"request_range": range_body(self.key, self.range_end)}


@dataclass(frozen=True, slots=True)
class PutOp:
    key: bytes
    value: bytes
    lease: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"request_put": put_body(self.key, self.value, self.lease)}


@dataclass(frozen=True, slots=True)
class DeleteOp:
    key: bytes
    range_end: bytes = b""

    def to_json(self) -> dict[str, Any]:
        return {"request_delete_range": range_body(self.key, self.range_end)}


Op = RangeOp | PutOp | DeleteOp


def prefix_end(prefix: bytes) -> bytes:
    """The ``range_end`` that makes a range cover every key starting with ``prefix``."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\x00"  # etcd: from key to the end of the keyspace


# ------------------------------------------------------------------ pure parsing


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(obj: Mapping[str, Any], field: str) -> bytes:
    raw = obj.get(field, "")
    if not isinstance(raw, str):
        raise ValueError(f"{field}: expected a base64 string, got {type(raw).__name__}")
    return base64.b64decode(raw, validate=True)


def as_int(obj: Mapping[str, Any], field: str) -> int:
    """proto3 JSON: int64 fields are strings, and a zero is left out."""
    raw = obj.get(field, 0)
    if isinstance(raw, bool) or not isinstance(raw, int | str):
        raise ValueError(f"{field}: expected an integer, got {raw!r}")
    return int(raw)


def as_mapping(obj: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise ValueError(f"{what}: expected an object, got {type(obj).__name__}")
    return obj


def header_revision(obj: Mapping[str, Any]) -> int:
    return as_int(as_mapping(obj.get("header", {}), "header"), "revision")


def range_body(key: bytes, range_end: bytes) -> dict[str, Any]:
    body: dict[str, Any] = {"key": _b64(key)}
    if range_end:
        body["range_end"] = _b64(range_end)
    return body


def put_body(key: bytes, value: bytes, lease: int) -> dict[str, Any]:
    body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
    if lease:
        body["lease"] = str(lease)
    return body


def parse_kv(obj: Any) -> KeyValue:
    kv = as_mapping(obj, "kv")
    return KeyValue(key=_unb64(kv, "key"), value=_unb64(kv, "value"),
                    create_revision=as_int(kv, "create_revision"), mod_revision=as_int(kv, "mod_revision"),
                    version=as_int(kv, "version"), lease=as_int(kv, "lease"))


def parse_range(obj: Any) -> RangeResult:
    body = as_mapping(obj, "range response")
    kvs = tuple(parse_kv(kv) for kv in body.get("kvs", ()))
    return RangeResult(revision=header_revision(body), kvs=kvs, more=bool(body.get("more", False)),
                       count=as_int(body, "count"))


def parse_txn(obj: Any) -> TxnResult:
    body = as_mapping(obj, "txn response")
    responses: list[RangeResult | PutResult | DeleteResult] = []
    for item in body.get("responses", ()):
        item = as_mapping(item, "txn response item")
        if "response_range" in item:
            responses.append(parse_range(item["response_range"]))
        elif "response_put" in item:
            responses.append(PutResult(header_revision(as_mapping(item["response_put"], "response_put"))))
        elif "response_delete_range" in item:
            deleted = as_mapping(item["response_delete_range"], "response_delete_range")
            responses.append(DeleteResult(header_revision(deleted), as_int(deleted, "deleted")))
        else:
            raise ValueError(f"txn response item: unknown kind {sorted(item)}")
    return TxnResult(succeeded=bool(body.get("succeeded", False)), revision=header_revision(body),
                     responses=tuple(responses))


class StreamError(ValueError):
    """A streamed endpoint answered ``{"error": {...}}`` instead of a result."""


def parse_watch_response(obj: Any) -> WatchResponse:
    """One line of ``/v3/watch``: ``{"result": {...}}``, or ``{"error": {...}}`` (StreamError)."""
    line = as_mapping(obj, "watch message")
    if "error" in line:
        raise StreamError(f"watch stream error: {error_text(line['error'])}")
    result = as_mapping(line.get("result"), "watch result")
    events = []
    for event in result.get("events", ()):
        event = as_mapping(event, "watch event")
        kind: Literal["put", "delete"] = "delete" if event.get("type", "PUT") == "DELETE" else "put"
        events.append(EtcdEvent(kind, parse_kv(event.get("kv", {}))))
    return WatchResponse(revision=header_revision(result), watch_id=as_int(result, "watch_id"),
                         created=bool(result.get("created", False)),
                         canceled=bool(result.get("canceled", False)),
                         compact_revision=as_int(result, "compact_revision"),
                         cancel_reason=str(result.get("cancel_reason", "")), events=tuple(events))


def error_text(error: Any) -> str:
    """The gateway's error body: ``{"error", "message", "code"}`` (unary) or
    ``{"grpc_code", "http_code", "message"}`` (inside a stream)."""
    if isinstance(error, Mapping):
        message = error.get("message") or error.get("error") or "unknown error"
        code = error.get("code", error.get("grpc_code"))
        return f"{message} (grpc code {code})" if code is not None else str(message)
    return str(error)


class _Readable(Protocol):
    async def readany(self) -> bytes: ...


class LineReader:
    """Newline-delimited messages from a streamed body, each at most ``max_line`` bytes.

    aiohttp's own ``readline`` caps a line at its buffer's high-water mark, smaller than one
    big watch batch; this one has an explicit bound and says when it is crossed."""

    def __init__(self, stream: _Readable, max_line: int) -> None:
        self._stream = stream
        self._max_line = max_line
        self._buffer = bytearray()

    async def next(self) -> bytes | None:
        """The next line without its newline; None at the end of the stream."""
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[:end + 1]
                return line
            if len(self._buffer) > self._max_line:
                raise ValueError(f"a message longer than {self._max_line} bytes")
            chunk = await self._stream.readany()
            if not chunk:
                # the gateway's last message (an error, when etcd shuts down) has no newline
                line, self._buffer = bytes(self._buffer), bytearray()
                return line if line.strip() else None
            self._buffer += chunk
