"""The directory store: revisions, expect, persistence across a reopen, ephemeral keys, watches."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from control.store import Conflict, StoreError, WatchEvent
from control.store_dir import DirectoryStore


async def test_put_get_list_delete_with_revisions(tmp_path: Path) -> None:
    store = await DirectoryStore.open(tmp_path / "s")
    r1 = await store.put("config/current", b"one")
    r2 = await store.put("tokens/abc", b"t")
    assert 0 < r1 < r2
    entry = await store.get("config/current")
    assert entry is not None and entry.value == b"one" and entry.revision == r1
    assert [e.key for e in await store.list("tokens/")] == ["tokens/abc"]
    assert await store.delete("tokens/abc") is True
    assert await store.delete("tokens/abc") is False
    assert await store.get("tokens/abc") is None
    assert await store.put("config/current", b"two") > r2  # a delete used a revision too
    await store.close()


async def test_expect_zero_means_absent_and_a_stale_revision_conflicts(tmp_path: Path) -> None:
    store = await DirectoryStore.open(tmp_path)
    rev = await store.put("k", b"1", expect=0)
    with pytest.raises(Conflict, match="expected revision 0"):
        await store.put("k", b"x", expect=0)
    await store.put("k", b"2", expect=rev)
    with pytest.raises(Conflict):
        await store.put("k", b"3", expect=rev)
    with pytest.raises(Conflict):
        await store.delete("k", expect=rev)
    assert (await store.get("k")).value == b"2"  # type: ignore[union-attr]


async def test_concurrent_expect_writers_exactly_one_wins(tmp_path: Path) -> None:
    store = await DirectoryStore.open(tmp_path)
    base = await store.put("config/current", b"v0")

    async def writer(i: int) -> int | None:
        try:
            return await store.put("config/current", b"v%d" % i, expect=base)
        except Conflict:
            return None

    results = await asyncio.gather(*(writer(i) for i in range(8)))
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    entry = await store.get("config/current")
    assert entry is not None and entry.revision == winners[0]


async def test_restart_keeps_values_and_revisions_not_ephemeral_keys(tmp_path: Path) -> None:
    store = await DirectoryStore.open(tmp_path)
    await store.put("config/history/00000001", b"a")
    await store.put("registry/orders/n1", b"e", ephemeral=True)
    last = await store.put("tokens/t1", b"t")
    await store.delete("tokens/t1")
    await store.close()
    assert not list(tmp_path.rglob("n1"))  # ephemeral: never on disk

    reopened = await DirectoryStore.open(tmp_path)
    assert (await reopened.get("config/history/00000001")).value == b"a"  # type: ignore[union-attr]
    assert await reopened.get("registry/orders/n1") is None
    assert await reopened.get("tokens/t1") is None
    # Revisions never go back, even past a delete (the last thing that happened).
    assert reopened.revision == last + 1
    assert await reopened.put("x", b"") == last + 2


async def test_files_are_private_and_no_temp_files_remain(tmp_path: Path) -> None:
    store = await DirectoryStore.open(tmp_path)
    await store.put("tokens/t1", b"secret-hash")
    path = tmp_path / "tokens" / "t1"
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.rglob("*.tmp")] == []


async def test_keys_cannot_escape_the_root(tmp_path: Path) -> None:
    store = await DirectoryStore.open(tmp_path / "s")
    for key in ("../x", "a/../../x", "/abs", "a//b", ".revision", "a/.hidden", ""):
        with pytest.raises(StoreError, match="invalid store key"):
            await store.put(key, b"")


async def test_a_key_that_is_also_a_folder_is_a_store_error(tmp_path: Path) -> None:
    store = await DirectoryStore.open(tmp_path)
    await store.put("a", b"")
    with pytest.raises(StoreError, match="cannot write"):
        await store.put("a/b", b"")
    assert await store.get("a/b") is None


async def test_watch_sees_changes_in_order_under_its_prefix(tmp_path: Path) -> None:
    store = await DirectoryStore.open(tmp_path)
    watch = store.watch("registry/")
    await store.put("config/current", b"c")
    r1 = await store.put("registry/a/n1", b"x", ephemeral=True)
    r2 = await store.put("registry/a/n1", b"y")
    r3 = await store.delete("registry/a/n1") and store.revision
    events = [await anext(watch) for _ in range(3)]
    assert events == [WatchEvent("put", "registry/a/n1", b"x", r1),
                      WatchEvent("put", "registry/a/n1", b"y", r2),
                      WatchEvent("delete", "registry/a/n1", b"", r3)]
    await watch.aclose()  # type: ignore[attr-defined]


async def test_watch_after_a_revision_replays_what_is_held(tmp_path: Path) -> None:
    store = await DirectoryStore.open(tmp_path)
    r1 = await store.put("k/a", b"1")
    await store.put("k/b", b"2")
    watch = store.watch("k/", after=r1)
    assert (await anext(watch)).key == "k/b"
    await store.close()
    reopened = await DirectoryStore.open(tmp_path)
    with pytest.raises(StoreError, match="no longer held"):
        reopened.watch("k/", after=r1)


async def test_a_watcher_that_falls_behind_loses_its_watch_writers_never_wait(tmp_path: Path) -> None:
    store = await DirectoryStore.open(tmp_path, watch_queue=4)
    slow = store.watch("k")
    for i in range(10):
        await store.put("k", b"%d" % i, ephemeral=True)  # never blocks on the slow watcher
    with pytest.raises(StoreError, match="fell behind"):
        for _ in range(10):
            await anext(slow)


async def test_writes_run_off_the_event_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fsyncs happen in a worker thread: the loop keeps running meanwhile."""
    store = await DirectoryStore.open(tmp_path)
    loop_thread = asyncio.get_running_loop()._thread_id  # type: ignore[attr-defined]
    seen: list[int | None] = []
    real = os.fsync

    def spy(fd: int) -> None:
        seen.append(threading.get_ident())
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    await store.put("k", b"v")
    assert seen and loop_thread not in seen
