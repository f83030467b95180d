"""The control plane's store on etcd v3, for several replicas serving one mesh.

Store keys live under a prefix (``/pake/`` by default). ``expect`` is a txn that compares
the key's mod_revision (0: its create_revision, i.e. the key is absent). Ephemeral keys are
attached to this replica's lease, which a background task keeps alive: when the replica
dies its lease expires and etcd deletes them; when the lease is lost while the replica
lives (etcd unreachable for a TTL, or the lease revoked), ``on_lease_lost`` says so, the
ephemeral keys are gone, and the next ephemeral put grants a new lease.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence

import structlog

from control.etcd import NOT_FOUND, EtcdClient, EtcdError
from control.etcd_wire import (
    Compare,
    DeleteOp,
    DeleteResult,
    KeyValue,
    Lease,
    PutOp,
    PutResult,
    RangeOp,
    RangeResult,
    TxnResult,
    prefix_end,
)
from control.store import Conflict, Entry, StoreError, WatchEvent

__all__ = ["EtcdStore"]

log = structlog.get_logger("pake.control.store_etcd")

_LIST_PAGE = 1000  # keys per range request when listing a prefix
_KEEPALIVE_MAX_INTERVAL = 10.0  # seconds between keepalives, at most, whatever the TTL


class EtcdStore:
    """``control.store.Store`` on etcd. Open it with ``await EtcdStore.connect(...)``."""

    def __init__(self, client: EtcdClient, *, prefix: str = "/pake/", lease_ttl: int = 10,
                 on_lease_lost: Callable[[str], None] | None = None, list_page: int = _LIST_PAGE) -> None:
        if not prefix:
            raise ValueError("etcd store prefix: expected a non-empty prefix such as '/pake/'")
        if lease_ttl < 2:
            raise ValueError(f"etcd store lease_ttl: expected at least 2 seconds, got {lease_ttl}")
        if list_page < 1:
            raise ValueError(f"etcd store list_page: expected at least 1, got {list_page}")
        self.client = client
        self.list_page = list_page
        self.prefix = prefix
        self._prefix_bytes = prefix.encode()
        self.lease_ttl = lease_ttl
        # Refresh three times per TTL, so one lost keepalive never costs the lease.
        self.keepalive_interval = min(lease_ttl / 3, _KEEPALIVE_MAX_INTERVAL)
        self.on_lease_lost = on_lease_lost
        # Set when this replica's lease was lost (its ephemeral keys are gone); cleared when
        # the next ephemeral put has granted a new one.
        self.lease_lost = asyncio.Event()
        self._lease: Lease | None = None
        self._lease_lock = asyncio.Lock()
        self._keepalive: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    async def connect(cls, endpoints: Sequence[str], *, prefix: str = "/pake/", lease_ttl: int = 10,
                      timeout: float = 5.0, on_lease_lost: Callable[[str], None] | None = None) -> EtcdStore:
        """A store whose lease is granted already: an unreachable etcd fails here, at start."""
        client = EtcdClient(endpoints, timeout=timeout)
        store = cls(client, prefix=prefix, lease_ttl=lease_ttl, on_lease_lost=on_lease_lost)
        try:
            await store._ensure_lease()
        except BaseException:
            await client.close()
            raise
        return store

    def __repr__(self) -> str:
        lease = f"{self._lease.id:x}" if self._lease else "none"
        return f"<EtcdStore prefix={self.prefix!r} lease={lease} {self.client!r}>"

    @property
    def lease_id(self) -> int | None:
        """This replica's current lease, None while it has none."""
        return self._lease.id if self._lease else None

    # ---- Store

    async def get(self, key: str) -> Entry | None:
        result = await self._live().range(self._key(key))
        return self._entry(result.kvs[0]) if result.kvs else None

    async def list(self, prefix: str) -> list[Entry]:
        client = self._live()
        start, end = self._key(prefix), self._end(prefix)
        entries: list[Entry] = []
        revision = 0  # every page is read at the first page's revision: one consistent view
        while True:
            page = await client.range(start, range_end=end, revision=revision, limit=self.list_page)
            revision = revision or page.revision
            entries.extend(self._entry(kv) for kv in page.kvs)
            if not page.more or not page.kvs:
                return entries
            start = page.kvs[-1].key + b"\x00"

    async def put(self, key: str, value: bytes, *, expect: int | None = None, ephemeral: bool = False) -> int:
        client = self._live()
        for attempt in (1, 2):
            lease = await self._ensure_lease() if ephemeral else 0
            try:
                if expect is None:
                    return (await client.put(self._key(key), value, lease=lease)).revision
                result = await client.txn([self._compare(key, expect)], [PutOp(self._key(key), value, lease)],
                                          [RangeOp(self._key(key))])
            except EtcdError as exc:
                if ephemeral and attempt == 1 and exc.code == NOT_FOUND:
                    # the lease expired between our last keepalive and this put
                    self._lose_lease(lease, f"etcd no longer knows lease {lease:x}")
                    continue
                raise
            if not result.succeeded:
                raise Conflict(self._conflict_text(key, expect, result))
            response = result.responses[0]
            return response.revision if isinstance(response, PutResult) else result.revision
        raise StoreError(f"etcd put {key!r}: lease lost twice in a row")  # pragma: no cover (loop bound)

    async def delete(self, key: str, *, expect: int | None = None) -> bool:
        client = self._live()
        if expect is None:
            return (await client.delete(self._key(key))).deleted > 0
        result = await client.txn([self._compare(key, expect)], [DeleteOp(self._key(key))],
                                  [RangeOp(self._key(key))])
        if not result.succeeded:
            raise Conflict(self._conflict_text(key, expect, result))
        response = result.responses[0]
        return isinstance(response, DeleteResult) and response.deleted > 0

    async def watch(self, prefix: str, *, after: int = 0) -> AsyncIterator[WatchEvent]:
        """Changes under ``prefix`` after revision ``after`` (so from ``after + 1``; etcd keeps
        history until it is compacted, and a watch from a compacted revision raises)."""
        client = self._live()
        async for event in client.watch(self._key(prefix), range_end=self._end(prefix), start_revision=after + 1):
            kv = event.kv
            yield WatchEvent(event.kind, self._strip(kv.key), kv.value if event.kind == "put" else b"",
                             kv.mod_revision)

    async def close(self) -> None:
        """Stop the keepalive, revoke the lease (this replica's ephemeral keys go at once rather
        than a TTL later), close the connections. Never raises: a failed revoke is logged, and
        the lease then expires on its own."""
        if self._closed:
            return
        self._closed = True
        await self._stop_keepalive()
        lease, self._lease = self._lease, None
        try:
            if lease is not None:
                await self.client.lease_revoke(lease.id, timeout=min(self.client.timeout, self.lease_ttl))
        except StoreError as exc:
            log.warning("etcd_lease_revoke_failed", lease=f"{lease.id:x}" if lease else None, error=str(exc),
                        expires_in_s=self.lease_ttl)
        finally:
            await self.client.close()

    # ---- the lease

    async def _ensure_lease(self) -> int:
        async with self._lease_lock:
            if self._lease is None:
                self._live()
                lease = await self.client.lease_grant(self.lease_ttl)
                self._lease = lease
                self.lease_lost.clear()
                self._keepalive = asyncio.get_running_loop().create_task(
                    self._keep_alive(lease), name=f"etcd-lease-keepalive-{lease.id:x}")
                log.info("etcd_lease_granted", lease=f"{lease.id:x}", ttl_s=lease.ttl)
            return self._lease.id

    async def _keep_alive(self, lease: Lease) -> None:
        """Refresh ``lease`` every ``keepalive_interval``; give it up when etcd says it is gone
        or when no refresh succeeded for a whole TTL (etcd has expired it by then)."""
        loop = asyncio.get_running_loop()
        refreshed = loop.time()
        while True:
            await asyncio.sleep(self.keepalive_interval)
            try:
                ttl = await self.client.lease_keepalive(lease.id, timeout=self.keepalive_interval)
            except StoreError as exc:
                if loop.time() - refreshed >= lease.ttl:
                    self._lose_lease(lease.id, f"no keepalive succeeded for {lease.ttl}s: {exc}")
                    return
                log.warning("etcd_lease_keepalive_failed", lease=f"{lease.id:x}", error=str(exc))
                continue
            if ttl <= 0:
                self._lose_lease(lease.id, f"etcd no longer knows lease {lease.id:x} (expired or revoked)")
                return
            refreshed = loop.time()

    def _lose_lease(self, lease_id: int, reason: str) -> None:
        if self._lease is None or self._lease.id != lease_id:
            return  # already handled
        self._lease = None
        task, self._keepalive = self._keepalive, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        self.lease_lost.set()
        log.warning("etcd_lease_lost", lease=f"{lease_id:x}", reason=reason)
        if self.on_lease_lost is not None:
            try:
                self.on_lease_lost(reason)
            except Exception:  # the caller's bug must not kill the keepalive task silently
                log.exception("etcd_lease_lost_callback_failed", lease=f"{lease_id:x}")

    async def _stop_keepalive(self) -> None:
        task, self._keepalive = self._keepalive, None
        if task is None or task.done():
            return
        task.cancel()
        # gather() absorbs the task's own CancelledError but re-raises ours
        await asyncio.gather(task, return_exceptions=True)

    # ---- helpers

    def _live(self) -> EtcdClient:
        if self._closed:
            raise StoreError("etcd store is closed")
        return self.client

    def _key(self, key: str) -> bytes:
        return (self.prefix + key).encode()

    def _end(self, prefix: str) -> bytes:
        return prefix_end(self._key(prefix))

    def _strip(self, key: bytes) -> str:
        return key[len(self._prefix_bytes):].decode()

    def _entry(self, kv: KeyValue) -> Entry:
        return Entry(self._strip(kv.key), kv.value, kv.mod_revision)

    def _compare(self, key: str, expect: int) -> Compare:
        if expect < 0:
            raise ValueError(f"expect for {key!r}: expected a revision >= 0, got {expect}")
        if expect == 0:
            return Compare(self._key(key), "CREATE", 0)  # created at revision 0: absent
        return Compare(self._key(key), "MOD", expect)

    @staticmethod
    def _conflict_text(key: str, expect: int, failed: TxnResult) -> str:
        """What the failed txn's own read found: the state that made the compare fail."""
        read = failed.responses[0] if failed.responses else None
        current = read.kvs[0] if isinstance(read, RangeResult) and read.kvs else None
        found = f"revision {current.mod_revision}" if current else "no key"
        wanted = "no key" if expect == 0 else f"revision {expect}"
        return f"{key}: expected {wanted}, found {found} (written by someone else since it was read)"
