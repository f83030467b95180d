"""EtcdStore against a real etcd on loopback: the store contract, leases, watches, failover."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from control.etcd import EtcdClient
from control.etcd_wire import Compare, PutOp
from control.store import Conflict, Entry, StoreError, WatchEvent
from control.store_etcd import EtcdStore
from tests.helpers.etcd import EtcdServer

_ROOT = Path(__file__).resolve().parents[2]
TTL = 2  # seconds: the shortest lease the store accepts, so expiry tests stay fast


@pytest.fixture
async def etcd(tmp_path: Path) -> AsyncIterator[EtcdServer]:
    async with EtcdServer(tmp_path) as server:
        yield server


@pytest.fixture
async def store(etcd: EtcdServer) -> AsyncIterator[EtcdStore]:
    opened = await EtcdStore.connect(etcd.endpoints, lease_ttl=TTL)
    yield opened
    await opened.close()


@pytest.fixture
async def replica(etcd: EtcdServer) -> AsyncIterator[EtcdStore]:
    """A second control-plane replica on the same etcd."""
    opened = await EtcdStore.connect(etcd.endpoints, lease_ttl=TTL)
    yield opened
    await opened.close()


async def take(events: AsyncIterator[WatchEvent], count: int, timeout: float = 5.0) -> list[WatchEvent]:
    got: list[WatchEvent] = []
    async with asyncio.timeout(timeout):
        async for event in events:
            got.append(event)
            if len(got) == count:
                break
    return got


async def test_get_put_list_delete(store: EtcdStore, etcd: EtcdServer) -> None:
    assert await store.get("config/current") is None
    first = await store.put("config/current", b'{"v": 1}')
    second = await store.put("config/current", b'{"v": 2}')
    assert second > first > 0
    entry = await store.get("config/current")
    assert entry is not None and (entry.key, entry.value, entry.revision) == ("config/current", b'{"v": 2}', second)

    await store.put("registry/orders/node-2", b"b")
    await store.put("registry/orders/node-1", b"a")
    await store.put("registry/ordersX/node-1", b"other service")
    listed = await store.list("registry/orders/")
    assert [(e.key, e.value) for e in listed] == [("registry/orders/node-1", b"a"), ("registry/orders/node-2", b"b")]

    assert await store.delete("registry/orders/node-1") is True
    assert await store.delete("registry/orders/node-1") is False
    assert [e.key for e in await store.list("registry/orders/")] == ["registry/orders/node-2"]

    # the keys live under the store's prefix and nowhere else: another prefix sees nothing
    other = await EtcdStore.connect(etcd.endpoints, prefix="/other/", lease_ttl=TTL)
    try:
        assert await other.list("") == []
    finally:
        await other.close()


async def test_list_reads_every_page_at_one_revision(etcd: EtcdServer) -> None:
    paged = EtcdStore(EtcdClient(etcd.endpoints), lease_ttl=TTL, list_page=2)
    try:
        for i in range(5):
            await paged.put(f"tokens/{i}", str(i).encode())
        assert [e.value for e in await paged.list("tokens/")] == [b"0", b"1", b"2", b"3", b"4"]
    finally:
        await paged.close()


async def test_two_concurrent_writers_with_the_same_expect_one_wins(store: EtcdStore, replica: EtcdStore) -> None:
    read = await store.put("config/current", b"v1")
    results = await asyncio.gather(store.put("config/current", b"from A", expect=read),
                                   replica.put("config/current", b"from B", expect=read), return_exceptions=True)
    wins = [r for r in results if isinstance(r, int)]
    losses = [r for r in results if isinstance(r, Conflict)]
    assert len(wins) == 1 and len(losses) == 1, results
    assert f"expected revision {read}, found revision {wins[0]}" in str(losses[0])
    current = await store.get("config/current")
    assert current is not None and current.revision == wins[0]
    assert current.value == (b"from A" if results[0] == wins[0] else b"from B")


async def test_expect_zero_means_absent_for_creates_and_deletes(store: EtcdStore, replica: EtcdStore) -> None:
    results = await asyncio.gather(store.put("tokens/t1", b"A", expect=0), replica.put("tokens/t1", b"B", expect=0),
                                   return_exceptions=True)
    assert sorted(type(r).__name__ for r in results) == ["Conflict", "int"], results
    with pytest.raises(Conflict, match="expected no key, found revision"):
        await store.put("tokens/t1", b"again", expect=0)

    entry = await store.get("tokens/t1")
    assert entry is not None
    with pytest.raises(Conflict, match=f"expected revision {entry.revision + 100}"):
        await store.delete("tokens/t1", expect=entry.revision + 100)
    assert await store.delete("tokens/t1", expect=entry.revision) is True
    assert await store.delete("tokens/t1", expect=0) is False
    with pytest.raises(Conflict, match="found no key"):
        await store.put("tokens/t1", b"x", expect=entry.revision)


async def test_ephemeral_keys_vanish_when_the_owner_closes(etcd: EtcdServer, replica: EtcdStore) -> None:
    owner = await EtcdStore.connect(etcd.endpoints, lease_ttl=TTL)
    await owner.put("registry/orders/node-1", b"up", ephemeral=True)
    await owner.put("config/current", b"durable")
    assert await replica.get("registry/orders/node-1") is not None
    await owner.close()
    assert await replica.get("registry/orders/node-1") is None  # revoked at close, not a TTL later
    assert await replica.get("config/current") is not None
    with pytest.raises(StoreError, match="closed"):
        await owner.get("config/current")


_OWNER = """
import asyncio, sys
from control.store_etcd import EtcdStore

async def main() -> None:
    store = await EtcdStore.connect([sys.argv[1]], lease_ttl={ttl})
    revision = await store.put("registry/orders/node-9", b"up", ephemeral=True)
    print("put-revision", revision, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_ephemeral_keys_vanish_when_the_owner_dies_without_close(etcd: EtcdServer,
                                                                         replica: EtcdStore) -> None:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", _OWNER.format(ttl=TTL), etcd.url,
                                                stdout=asyncio.subprocess.PIPE, cwd=str(_ROOT))
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(10):
            while not (line := await proc.stdout.readline()).startswith(b"put-revision "):
                assert line, "the owner process exited before writing its key"
        revision = int(line.split()[1])
        assert await replica.get("registry/orders/node-9") is not None
        proc.kill()  # SIGKILL: no close(), no revoke; only the lease's expiry can clean up
        killed = time.monotonic()
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    [event] = await take(replica.watch("registry/orders/", after=revision), 1, timeout=TTL + 3)
    gone_after = time.monotonic() - killed
    assert (event.kind, event.key, event.value) == ("delete", "registry/orders/node-9", b"")
    assert gone_after < TTL + 1.5, gone_after
    assert await replica.get("registry/orders/node-9") is None


async def test_watch_replays_puts_and_deletes_in_order_from_a_revision(store: EtcdStore) -> None:
    before = await store.put("registry/a", b"0")
    await store.put("registry/a", b"1")
    await store.put("registry/b", b"2")
    await store.put("elsewhere/x", b"not watched")
    await store.delete("registry/a")
    events = await take(store.watch("registry/", after=before), 3)
    assert [(e.kind, e.key, e.value) for e in events] == [
        ("put", "registry/a", b"1"), ("put", "registry/b", b"2"), ("delete", "registry/a", b"")]
    revisions = [e.revision for e in events]
    assert revisions == sorted(revisions) and revisions[0] > before


async def test_a_second_replica_sees_the_first_ones_changes_through_watch(store: EtcdStore,
                                                                          replica: EtcdStore) -> None:
    start = await store.put("config/seed", b"")
    watch = replica.watch("config/", after=start)
    seen = asyncio.create_task(take(watch, 3))
    put1 = await store.put("config/current", b"v1")
    put2 = await store.put("config/current", b"v2", expect=put1)
    await store.delete("config/current", expect=put2)
    events = await seen
    assert [(e.kind, e.value, e.revision) for e in events][:2] == [("put", b"v1", put1), ("put", b"v2", put2)]
    assert events[2].kind == "delete" and events[2].revision > put2


async def test_watch_from_a_compacted_revision_is_a_store_error(store: EtcdStore, etcd: EtcdServer) -> None:
    first = await store.put("config/current", b"v1")
    latest = await store.put("config/current", b"v2")
    admin = EtcdClient(etcd.endpoints)
    try:
        await admin.compact(latest)
    finally:
        await admin.close()
    with pytest.raises(StoreError, match=f"revision {first} was compacted"):
        await take(store.watch("config/", after=first - 1), 1)


async def test_watch_survives_an_etcd_restart_without_losing_or_repeating_events(store: EtcdStore,
                                                                                  etcd: EtcdServer) -> None:
    start = await store.put("config/seed", b"")
    watch = store.watch("config/", after=start)
    before = await store.put("config/current", b"before")
    [event] = await take(watch, 1)
    assert event.revision == before
    await etcd.stop()
    await etcd.start()  # same data dir and port: the watch reconnects from before + 1
    after = await store.put("config/current", b"after")
    [event] = await take(watch, 1, timeout=8)
    assert (event.value, event.revision) == (b"after", after)
    await watch.aclose()  # type: ignore[attr-defined]


async def test_the_replica_learns_when_its_lease_is_lost_and_can_re_register(store: EtcdStore,
                                                                             etcd: EtcdServer) -> None:
    reasons: list[str] = []
    store.on_lease_lost = reasons.append
    await store.put("registry/orders/node-1", b"up", ephemeral=True)
    old = store.lease_id
    assert old is not None
    other = EtcdClient(etcd.endpoints)
    try:
        await other.lease_revoke(old)  # e.g. an operator, or etcd expiring it during a partition
    finally:
        await other.close()
    async with asyncio.timeout(TTL + 2):
        await store.lease_lost.wait()
    assert reasons and "no longer knows lease" in reasons[0]
    assert await store.get("registry/orders/node-1") is None
    await store.put("registry/orders/node-1", b"up again", ephemeral=True)  # grants a new lease
    assert store.lease_id not in (None, old) and not store.lease_lost.is_set()
    assert (await store.get("registry/orders/node-1")) is not None


@pytest.mark.parametrize("expect", [None, 0])
async def test_an_ephemeral_put_on_a_lease_etcd_dropped_moves_to_a_new_lease(etcd: EtcdServer,
                                                                             expect: int | None) -> None:
    reasons: list[str] = []
    # a long TTL: the keepalive (every 10 s) cannot notice first; the put itself must
    slow = await EtcdStore.connect(etcd.endpoints, lease_ttl=30, on_lease_lost=reasons.append)
    try:
        old = slow.lease_id
        assert old is not None
        other = EtcdClient(etcd.endpoints)
        try:
            await other.lease_revoke(old)
        finally:
            await other.close()
        await slow.put("registry/orders/node-1", b"up", ephemeral=True, expect=expect)
        assert slow.lease_id not in (None, old)
        assert reasons == [f"etcd no longer knows lease {old:x}"]
        entry = await slow.get("registry/orders/node-1")
        assert entry is not None and entry.value == b"up"
    finally:
        await slow.close()
    assert await _fresh_get(etcd, "registry/orders/node-1") is None  # on the new lease, revoked at close


async def _fresh_get(etcd: EtcdServer, key: str) -> Entry | None:
    reader = EtcdStore(EtcdClient(etcd.endpoints), lease_ttl=TTL)
    try:
        return await reader.get(key)
    finally:
        await reader.close()


async def test_the_replica_learns_when_etcd_is_gone_for_a_whole_ttl(store: EtcdStore, etcd: EtcdServer) -> None:
    await store.put("registry/orders/node-1", b"up", ephemeral=True)
    await etcd.kill()
    killed = time.monotonic()
    async with asyncio.timeout(TTL + 3):
        await store.lease_lost.wait()
    assert time.monotonic() - killed < TTL + 1.5
    with pytest.raises(StoreError, match="no endpoint answered"):
        await store.get("config/current")


async def test_calls_fail_over_to_the_next_endpoint(etcd: EtcdServer) -> None:
    with socket.socket() as dead:  # bound, never listening: connecting to it is refused
        dead.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{dead.getsockname()[1]}"
        replicated = await EtcdStore.connect([dead_url, etcd.url], lease_ttl=TTL)
        try:
            revision = await replicated.put("config/current", b"v1", expect=0)
            entry = await replicated.get("config/current")
            assert entry is not None and entry.revision == revision
        finally:
            await replicated.close()

        started = time.monotonic()
        with pytest.raises(StoreError) as raised:
            await EtcdStore.connect([dead_url], lease_ttl=TTL, timeout=1)
        assert time.monotonic() - started < 2
        assert "no endpoint answered" in str(raised.value) and dead_url in str(raised.value)


async def test_the_etcd_fixture_moves_to_another_port_when_its_pick_was_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        picks = iter([taken.getsockname()[1]])
        server = EtcdServer(tmp_path, pick_port=lambda: next(picks, 0) or _free_port())
        async with server:
            assert server.port != taken.getsockname()[1]
            client = EtcdClient(server.endpoints)
            try:
                assert (await client.put(b"k", b"v")).revision > 1
            finally:
                await client.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_silent_endpoint_costs_one_timeout_and_only_safe_calls_move_on(etcd: EtcdServer) -> None:
    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent_url = f"http://127.0.0.1:{silent.getsockname()[1]}"

        alone = EtcdClient([silent_url], timeout=0.3)
        try:
            started = time.monotonic()
            with pytest.raises(StoreError, match=r"no endpoint answered .*no answer within 0.3s"):
                await alone.range(b"k")
            assert time.monotonic() - started < 1.5
        finally:
            await alone.close()

        for attempt in ("put", "txn"):
            client = EtcdClient([silent_url, etcd.url], timeout=0.3)
            try:
                if attempt == "put":
                    # a plain put may be repeated safely: it moves on to the endpoint that answers
                    assert (await client.put(b"k", b"v")).revision > 1
                else:
                    # a txn the silent endpoint may have applied is not repeated elsewhere
                    with pytest.raises(StoreError, match="may or may not have been applied"):
                        await client.txn([Compare(b"k2", "CREATE", 0)], [PutOp(b"k2", b"v")])
            finally:
                await client.close()


async def test_a_watch_fails_over_and_a_quiet_one_is_not_declared_lost(etcd: EtcdServer) -> None:
    writer = EtcdStore(EtcdClient(etcd.endpoints), lease_ttl=TTL)
    with socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{dead.getsockname()[1]}"
        # reconnect every 0.2 s of silence, and give up after 0.5 s without an answer: a watch
        # that is merely quiet for longer than that must go on
        client = EtcdClient([dead_url, etcd.url], watch_idle=0.2, watch_reconnect_for=0.5)
        watcher = EtcdStore(client, lease_ttl=TTL)
        try:
            start = await writer.put("config/seed", b"")
            watch = watcher.watch("config/", after=start)
            first = await writer.put("config/current", b"v1")
            [event] = await take(watch, 1)
            assert event.revision == first
            await asyncio.sleep(1.2)  # quiet: several idle reconnects, across the dead endpoint too
            second = await writer.put("config/current", b"v2")
            [event] = await take(watch, 1)
            assert (event.value, event.revision) == (b"v2", second)  # nothing lost, nothing repeated
            await watch.aclose()  # type: ignore[attr-defined]
        finally:
            await watcher.close()
            await writer.close()
