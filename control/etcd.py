"""A small client for etcd v3's JSON gateway (grpc-gateway over HTTP/1.1), on aiohttp.

Rules: every call has a deadline; every failure is a ``StoreError`` that names the call and
the endpoint (never a raw aiohttp or JSON error); several client URLs fail over in turn.
The wire format (base64, int64 strings, omitted zeros) lives in ``control.etcd_wire``.
Paths are etcd 3.4's ``/v3/...`` (3.5+ keeps them).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from contextlib import aclosing
from typing import Any, TypeVar

import aiohttp

from control.etcd_wire import (
    Compare,
    DeleteResult,
    EtcdEvent,
    Lease,
    LineReader,
    Op,
    PutResult,
    RangeResult,
    StreamError,
    TxnResult,
    WatchResponse,
    as_int,
    as_mapping,
    error_text,
    header_revision,
    parse_range,
    parse_txn,
    parse_watch_response,
    prefix_end,
    put_body,
    range_body,
)
from control.store import StoreError

__all__ = ["NOT_FOUND", "EtcdClient", "EtcdError"]

# grpc status codes the gateway returns in {"code": N}
_UNAVAILABLE = 14
NOT_FOUND = 5  # etcd's only NotFound: "requested lease not found"
_WATCH_BACKOFF_MAX = 2.0  # seconds between watch reconnects, at most
_T = TypeVar("_T")


# --------------------------------------------------------------------------- client


class EtcdError(StoreError):
    """etcd refused a request; ``code`` is the grpc status code it gave, if any."""

    def __init__(self, message: str, *, code: int | None) -> None:
        super().__init__(message)
        self.code = code


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
        body = range_body(key, prefix_end(key) if prefix else range_end)
        if revision:
            body["revision"] = str(revision)
        if limit:
            body["limit"] = str(limit)
        return await self._parsed("range", "/v3/kv/range", body, parse_range, idempotent=True)

    async def put(self, key: bytes, value: bytes, *, lease: int = 0) -> PutResult:
        def parse(obj: Any) -> PutResult:
            return PutResult(header_revision(as_mapping(obj, "put response")))
        return await self._parsed("put", "/v3/kv/put", put_body(key, value, lease), parse, idempotent=True)

    async def delete(self, key: bytes, *, range_end: bytes = b"", prefix: bool = False) -> DeleteResult:
        def parse(obj: Any) -> DeleteResult:
            body = as_mapping(obj, "delete response")
            return DeleteResult(header_revision(body), as_int(body, "deleted"))
        body = range_body(key, prefix_end(key) if prefix else range_end)
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
            body = as_mapping(obj, "lease grant response")
            if body.get("error"):
                raise ValueError(str(body["error"]))
            return Lease(as_int(body, "ID"), as_int(body, "TTL"))
        if ttl < 1:
            raise ValueError(f"etcd lease ttl: expected at least 1 second, got {ttl}")
        return await self._parsed("lease grant", "/v3/lease/grant", {"TTL": str(ttl)}, parse, idempotent=False)

    async def lease_keepalive(self, lease_id: int, *, timeout: float | None = None) -> int:
        """Refresh the lease once; its remaining TTL in seconds, 0 when it no longer exists.

        The endpoint is a stream; one request body with one message gets one answer."""
        def parse(obj: Any) -> int:
            line = as_mapping(obj, "keepalive response")
            if "error" in line:
                raise ValueError(error_text(line["error"]))
            return as_int(as_mapping(line.get("result", {}), "keepalive result"), "TTL")
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
        create: dict[str, Any] = {**range_body(key, range_end), "progress_notify": True}
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
        error = as_mapping(obj, "error") if isinstance(obj, Mapping) else {}
        code = error.get("code")
        if status == 503 or code == _UNAVAILABLE:
            raise _Unavailable(f"{endpoint}: {error_text(error) if error else f'HTTP {status}'}", sent=True)
        if not_found_ok and code == NOT_FOUND:
            return error
        detail = error_text(error) if error else f"HTTP {status}: {raw[:200].decode(errors='replace')!r}"
        raise EtcdError(f"etcd {what} at {endpoint}: {detail}", code=code if isinstance(code, int) else None)


def _describe(exc: BaseException, timeout: float | None = None) -> str:
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return f"no answer within {timeout:g}s" if timeout else "timed out"
    text = str(exc) or type(exc).__name__
    return text
