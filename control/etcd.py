"""A small client for etcd v3's JSON gateway (grpc-gateway over HTTP/1.1), on aiohttp.

Rules: every call has a deadline; every failure is a ``StoreError`` that names the call and
the endpoint (never a raw aiohttp or JSON error); several client URLs fail over in turn.
On the wire, keys and values are base64, int64 fields are JSON strings and zero-valued
fields are left out (the gateway's proto3 JSON): the ``parse_*`` functions below are pure
and turn that into typed values. Paths are etcd 3.4's ``/v3/...`` (3.5+ keeps them).
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

import aiohttp

from control.store import StoreError

__all__ = [
    "Compare",
    "DeleteOp",
    "DeleteResult",
    "EtcdClient",
    "EtcdEvent",
    "KeyValue",
    "Lease",
    "LineReader",
    "PutOp",
    "PutResult",
    "RangeOp",
    "RangeResult",
    "StreamError",
    "TxnResult",
    "WatchResponse",
    "parse_kv",
    "parse_range",
    "parse_txn",
    "parse_watch_response",
    "prefix_end",
]

# grpc status codes the gateway returns in {"code": N}
_UNAVAILABLE = 14
_NOT_FOUND = 5
_WATCH_BACKOFF_MAX = 2.0  # seconds between watch reconnects, at most
_T = TypeVar("_T")


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
        return {"request_range": _range_body(self.key, self.range_end)}


@dataclass(frozen=True, slots=True)
class PutOp:
    key: bytes
    value: bytes
    lease: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"request_put": _put_body(self.key, self.value, self.lease)}


@dataclass(frozen=True, slots=True)
class DeleteOp:
    key: bytes
    range_end: bytes = b""

    def to_json(self) -> dict[str, Any]:
        return {"request_delete_range": _range_body(self.key, self.range_end)}


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


def _int(obj: Mapping[str, Any], field: str) -> int:
    """proto3 JSON: int64 fields are strings, and a zero is left out."""
    raw = obj.get(field, 0)
    if isinstance(raw, bool) or not isinstance(raw, int | str):
        raise ValueError(f"{field}: expected an integer, got {raw!r}")
    return int(raw)


def _mapping(obj: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise ValueError(f"{what}: expected an object, got {type(obj).__name__}")
    return obj


def _header_revision(obj: Mapping[str, Any]) -> int:
    return _int(_mapping(obj.get("header", {}), "header"), "revision")


def _range_body(key: bytes, range_end: bytes) -> dict[str, Any]:
    body: dict[str, Any] = {"key": _b64(key)}
    if range_end:
        body["range_end"] = _b64(range_end)
    return body


def _put_body(key: bytes, value: bytes, lease: int) -> dict[str, Any]:
    body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
    if lease:
        body["lease"] = str(lease)
    return body


def parse_kv(obj: Any) -> KeyValue:
    kv = _mapping(obj, "kv")
    return KeyValue(key=_unb64(kv, "key"), value=_unb64(kv, "value"),
                    create_revision=_int(kv, "create_revision"), mod_revision=_int(kv, "mod_revision"),
                    version=_int(kv, "version"), lease=_int(kv, "lease"))


def parse_range(obj: Any) -> RangeResult:
    body = _mapping(obj, "range response")
    kvs = tuple(parse_kv(kv) for kv in body.get("kvs", ()))
    return RangeResult(revision=_header_revision(body), kvs=kvs, more=bool(body.get("more", False)),
                       count=_int(body, "count"))


def parse_txn(obj: Any) -> TxnResult:
    body = _mapping(obj, "txn response")
    responses: list[RangeResult | PutResult | DeleteResult] = []
    for item in body.get("responses", ()):
        item = _mapping(item, "txn response item")
        if "response_range" in item:
            responses.append(parse_range(item["response_range"]))
        elif "response_put" in item:
            responses.append(PutResult(_header_revision(_mapping(item["response_put"], "response_put"))))
        elif "response_delete_range" in item:
            deleted = _mapping(item["response_delete_range"], "response_delete_range")
            responses.append(DeleteResult(_header_revision(deleted), _int(deleted, "deleted")))
        else:
            raise ValueError(f"txn response item: unknown kind {sorted(item)}")
    return TxnResult(succeeded=bool(body.get("succeeded", False)), revision=_header_revision(body),
                     responses=tuple(responses))


class StreamError(ValueError):
    """A streamed endpoint answered ``{"error": {...}}`` instead of a result."""


def parse_watch_response(obj: Any) -> WatchResponse:
    """One line of ``/v3/watch``: ``{"result": {...}}``, or ``{"error": {...}}`` (StreamError)."""
    line = _mapping(obj, "watch message")
    if "error" in line:
        raise StreamError(f"watch stream error: {_error_text(line['error'])}")
    result = _mapping(line.get("result"), "watch result")
    events = []
    for event in result.get("events", ()):
        event = _mapping(event, "watch event")
        kind: Literal["put", "delete"] = "delete" if event.get("type", "PUT") == "DELETE" else "put"
        events.append(EtcdEvent(kind, parse_kv(event.get("kv", {}))))
    return WatchResponse(revision=_header_revision(result), watch_id=_int(result, "watch_id"),
                         created=bool(result.get("created", False)),
                         canceled=bool(result.get("canceled", False)),
                         compact_revision=_int(result, "compact_revision"),
                         cancel_reason=str(result.get("cancel_reason", "")), events=tuple(events))


def _error_text(error: Any) -> str:
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


# --------------------------------------------------------------------------- client


class _Unavailable(Exception):
    """This endpoint failed in a way another endpoint may not: try the next one."""

    def __init__(self, message: str, *, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent  # the request may have reached etcd (so it may have been applied)


class EtcdClient:
    """One aiohttp session to a list of etcd client URLs (``http://host:port``).

    A call goes to the endpoint that answered last; when it cannot be reached it moves on to
    the next. Reads, plain puts, keepalives and revokes also move on after a timeout or an
    "unavailable" answer; a txn, a delete or a lease grant only when the request never left
    (the connection was refused), because etcd may have applied it. One attempt takes at
    most ``timeout`` seconds, so a call takes at most ``timeout`` × endpoints."""

    def __init__(self, endpoints: Sequence[str], *, timeout: float = 5.0, connect_timeout: float = 1.0,
                 watch_idle: float = 60.0, watch_reconnect_for: float = 10.0,
                 max_message: int = 16 << 20) -> None:
        if not endpoints:
            raise ValueError("etcd: at least one endpoint is needed")
        for url in endpoints:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"etcd endpoint {url!r}: expected http://host:port or https://host:port")
        if timeout <= 0 or connect_timeout <= 0 or watch_idle <= 0 or watch_reconnect_for <= 0:
            raise ValueError("etcd: timeouts must be positive")
        self.endpoints = tuple(url.rstrip("/") for url in endpoints)
        self.timeout = timeout
        self.connect_timeout = min(connect_timeout, timeout)
        # A watch with no message for this long is reconnected (from its last revision): a
        # half-open connection would otherwise stay silent forever.
        self.watch_idle = watch_idle
        # A watch that cannot reconnect to any endpoint for this long is lost (StoreError).
        self.watch_reconnect_for = watch_reconnect_for
        self.max_message = max_message
        self._current = 0
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"<EtcdClient {list(self.endpoints)} current={self.endpoints[self._current]}>"

    # ---- KV

    async def range(self, key: bytes, *, range_end: bytes = b"", prefix: bool = False, revision: int = 0,
                    limit: int = 0) -> RangeResult:
        """One key, or ``[key, range_end)``, or every key under ``key`` when ``prefix``."""
        body = _range_body(key, prefix_end(key) if prefix else range_end)
        if revision:
            body["revision"] = str(revision)
        if limit:
            body["limit"] = str(limit)
        return await self._parsed("range", "/v3/kv/range", body, parse_range, idempotent=True)

    async def put(self, key: bytes, value: bytes, *, lease: int = 0) -> PutResult:
        def parse(obj: Any) -> PutResult:
            return PutResult(_header_revision(_mapping(obj, "put response")))
        return await self._parsed("put", "/v3/kv/put", _put_body(key, value, lease), parse, idempotent=True)

    async def delete(self, key: bytes, *, range_end: bytes = b"", prefix: bool = False) -> DeleteResult:
        def parse(obj: Any) -> DeleteResult:
            body = _mapping(obj, "delete response")
            return DeleteResult(_header_revision(body), _int(body, "deleted"))
        body = _range_body(key, prefix_end(key) if prefix else range_end)
        return await self._parsed("delete", "/v3/kv/deleterange", body, parse, idempotent=False)

    async def txn(self, compare: Sequence[Compare], success: Sequence[Op],
                  failure: Sequence[Op] = ()) -> TxnResult:
        body = {"compare": [c.to_json() for c in compare], "success": [op.to_json() for op in success],
                "failure": [op.to_json() for op in failure]}
        return await self._parsed("txn", "/v3/kv/txn", body, parse_txn, idempotent=False)

    async def compact(self, revision: int) -> None:
        """Drop the history before ``revision``: watches from older revisions then fail."""
        await self._call("compaction", "/v3/kv/compaction", {"revision": str(revision), "physical": True},
                         idempotent=True)

    # ---- leases

    async def lease_grant(self, ttl: int) -> Lease:
        def parse(obj: Any) -> Lease:
            body = _mapping(obj, "lease grant response")
            if body.get("error"):
                raise ValueError(str(body["error"]))
            return Lease(_int(body, "ID"), _int(body, "TTL"))
        if ttl < 1:
            raise ValueError(f"etcd lease ttl: expected at least 1 second, got {ttl}")
        return await self._parsed("lease grant", "/v3/lease/grant", {"TTL": str(ttl)}, parse, idempotent=False)

    async def lease_keepalive(self, lease_id: int, *, timeout: float | None = None) -> int:
        """Refresh the lease once; its remaining TTL in seconds, 0 when it no longer exists.

        The endpoint is a stream; one request body with one message gets one answer."""
        def parse(obj: Any) -> int:
            line = _mapping(obj, "keepalive response")
            if "error" in line:
                raise ValueError(_error_text(line["error"]))
            return _int(_mapping(line.get("result", {}), "keepalive result"), "TTL")
        return await self._parsed("lease keepalive", "/v3/lease/keepalive", {"ID": str(lease_id)}, parse,
                                  idempotent=True, timeout=timeout)

    async def lease_revoke(self, lease_id: int, *, timeout: float | None = None) -> None:
        """Revoke the lease (its keys are deleted); a lease already gone is not an error."""
        await self._call("lease revoke", "/v3/lease/revoke", {"ID": str(lease_id)}, idempotent=True,
                         timeout=timeout, not_found_ok=True)

    # ---- watch

    async def watch(self, key: bytes, *, range_end: bytes = b"", prefix: bool = False,
                    start_revision: int = 0) -> AsyncIterator[EtcdEvent]:
        """Events on ``key`` (or the range / prefix) from ``start_revision`` (0: from now), in
        revision order, until the iterator is closed.

        A broken or silent stream is reopened on the next endpoint from the revision after the
        last one seen, so no event is lost or repeated. Raises ``StoreError`` when etcd has
        compacted the revisions still needed, cancels the watch, or no endpoint answers for
        ``watch_reconnect_for`` seconds."""
        end = prefix_end(key) if prefix else range_end
        next_revision = start_revision
        failing_since: float | None = None
        backoff = 0.05
        loop = asyncio.get_running_loop()
        while True:
            endpoint = self._current_endpoint()
            try:
                async with aclosing(self._watch_stream(endpoint, key, end, next_revision)) as stream:
                    async for message in stream:
                        failing_since = None  # this endpoint answers
                        if message.canceled:
                            raise StoreError(self._cancel_text(endpoint, message, next_revision))
                        if message.created:
                            if next_revision == 0:
                                # "from now": a reconnect must resume right after this revision
                                next_revision = message.revision + 1
                            continue
                        backoff = 0.05  # only a stream that delivers resets the backoff
                        if message.is_progress:
                            next_revision = max(next_revision, message.revision + 1)
                            continue
                        for event in message.events:
                            yield event
                            next_revision = max(next_revision, event.kv.mod_revision + 1)
                # the server ended the stream: reconnect at once
                reason = "the stream ended"
            except _Unavailable as exc:
                reason = str(exc)
            now = loop.time()
            failing_since = now if failing_since is None else failing_since
            if now - failing_since >= self.watch_reconnect_for:
                raise StoreError(f"etcd watch on {key!r} lost: no endpoint answered for "
                                 f"{self.watch_reconnect_for:g}s (last: {reason})")
            self._failover(endpoint)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _WATCH_BACKOFF_MAX)

    def _cancel_text(self, endpoint: str, message: WatchResponse, next_revision: int) -> str:
        if message.compact_revision:
            return (f"etcd watch at {endpoint} lost: revision {next_revision} was compacted "
                    f"(etcd keeps revisions from {message.compact_revision}); re-read and watch again")
        return f"etcd watch at {endpoint} canceled: {message.cancel_reason or 'no reason given'}"

    async def _watch_stream(self, endpoint: str, key: bytes, range_end: bytes,
                            start_revision: int) -> AsyncGenerator[WatchResponse, None]:
        create: dict[str, Any] = {**_range_body(key, range_end), "progress_notify": True}
        if start_revision:
            create["start_revision"] = str(start_revision)
        session = self._get_session()
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout)
        try:
            async with asyncio.timeout(self.timeout):
                response = await session.post(f"{endpoint}/v3/watch", json={"create_request": create},
                                              timeout=timeout)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise _Unavailable(f"{endpoint}: {_describe(exc)}", sent=True) from None
        async with response:
            if response.status != 200:
                raise _Unavailable(f"{endpoint}: HTTP {response.status}", sent=True)
            reader = LineReader(response.content, self.max_message)
            while True:
                try:
                    async with asyncio.timeout(self.watch_idle):
                        line = await reader.next()
                except TimeoutError:
                    raise _Unavailable(f"{endpoint}: no message for {self.watch_idle:g}s", sent=True) from None
                except (aiohttp.ClientError, OSError) as exc:
                    raise _Unavailable(f"{endpoint}: {_describe(exc)}", sent=True) from None
                except ValueError as exc:
                    raise StoreError(f"etcd watch at {endpoint}: {exc}") from None
                if line is None:
                    return
                if not line.strip():
                    continue
                try:
                    message = parse_watch_response(json.loads(line))
                except StreamError as exc:
                    # e.g. "transport is closing" as etcd shuts down: reconnect elsewhere
                    raise _Unavailable(f"{endpoint}: {exc}", sent=True) from None
                except ValueError as exc:
                    raise StoreError(f"etcd watch at {endpoint}: malformed message: {exc}") from None
                yield message

    # ---- plumbing

    async def close(self) -> None:
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _get_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise StoreError("etcd client is closed")
        if self._session is None:
            # no connection cap beyond aiohttp's default (100): watches each hold one
            self._session = aiohttp.ClientSession(raise_for_status=False)
        return self._session

    def _current_endpoint(self) -> str:
        return self.endpoints[self._current]

    def _failover(self, endpoint: str) -> None:
        """Move on from ``endpoint`` (if another call has not already)."""
        if self.endpoints[self._current] == endpoint:
            self._current = (self._current + 1) % len(self.endpoints)

    async def _parsed(self, what: str, path: str, body: Mapping[str, Any], parse: Callable[[Any], _T], *,
                      idempotent: bool, timeout: float | None = None) -> _T:
        obj = await self._call(what, path, body, idempotent=idempotent, timeout=timeout)
        try:
            return parse(obj)
        except (ValueError, TypeError, KeyError) as exc:
            raise StoreError(f"etcd {what}: unexpected answer: {exc}") from None

    async def _call(self, what: str, path: str, body: Mapping[str, Any], *, idempotent: bool,
                    timeout: float | None = None, not_found_ok: bool = False) -> Any:
        failures: list[str] = []
        for _ in range(len(self.endpoints)):
            endpoint = self._current_endpoint()
            try:
                return await self._attempt(what, endpoint, path, body, timeout or self.timeout, not_found_ok)
            except _Unavailable as exc:
                failures.append(str(exc))
                self._failover(endpoint)
                if exc.sent and not idempotent:
                    raise StoreError(f"etcd {what}: {exc}; it may or may not have been applied") from None
        raise StoreError(f"etcd {what}: no endpoint answered ({'; '.join(failures)})")

    async def _attempt(self, what: str, endpoint: str, path: str, body: Mapping[str, Any], timeout: float,
                       not_found_ok: bool) -> Any:
        session = self._get_session()
        client_timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=min(self.connect_timeout, timeout))
        try:
            async with session.post(f"{endpoint}{path}", json=body, timeout=client_timeout) as response:
                raw = await response.read()
                status = response.status
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise _Unavailable(f"{endpoint}: {_describe(exc)}", sent=False) from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise _Unavailable(f"{endpoint}: {_describe(exc, timeout)}", sent=True) from None
        try:
            # a streamed endpoint (keepalive) answers one JSON message per line; we send one
            obj = json.loads(raw.strip().split(b"\n", 1)[0])
        except ValueError:
            obj = None
        if status == 200 and obj is not None:
            return obj
        error = _mapping(obj, "error") if isinstance(obj, Mapping) else {}
        code = error.get("code")
        if status == 503 or code == _UNAVAILABLE:
            raise _Unavailable(f"{endpoint}: {_error_text(error) if error else f'HTTP {status}'}", sent=True)
        if not_found_ok and code == _NOT_FOUND:
            return error
        detail = _error_text(error) if error else f"HTTP {status}: {raw[:200].decode(errors='replace')!r}"
        raise StoreError(f"etcd {what} at {endpoint}: {detail}")


def _describe(exc: BaseException, timeout: float | None = None) -> str:
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return f"no answer within {timeout:g}s" if timeout else "timed out"
    text = str(exc) or type(exc).__name__
    return text
