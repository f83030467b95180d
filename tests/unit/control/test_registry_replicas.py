"""Two replicas' registries over one (directory) store, each fed by its own store view: who
owns a registration, and what expiry may delete."""

from __future__ import annotations

import asyncio
from pathlib import Path

from control.registry import PREFIX, Registration, Registry
from control.store_dir import DirectoryStore
from control.view import StoreView
from tests.helpers.fake_clock import FakeClock


def reg(replica: str, address: str = "10.0.0.1:15006") -> Registration:
    return Registration(service="orders", node="n1", address=address, app_healthy=True,
                        registered_at="2025-01-01T00:00:00+00:00", replica=replica)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_sidecar_that_moved_is_not_deleted_by_its_old_replicas_expiry(tmp_path: Path) -> None:
    store = await DirectoryStore.open(tmp_path / "store")
    clock = FakeClock()
    a = Registry(store, 10.0, lambda: None, ephemeral=True, clock=clock.monotonic)
    b = Registry(store, 10.0, lambda: None, ephemeral=True, clock=clock.monotonic)
    views = [StoreView(store, (PREFIX,), r.on_store) for r in (a, b)]
    for view in views:
        await view.load()
    tasks = [asyncio.create_task(view.run()) for view in views]
    try:
        await a.register(reg("A"))
        await settle()
        assert b.get("orders", "n1") == reg("A")  # B sees A's registration through its view

        clock.advance(5)
        await b.register(reg("B"))  # the sidecar moved to B (same address)
        await settle()
        assert not a.heard_from("orders", "n1")  # A no longer owns it
        clock.advance(6)  # past A's grace since it last heard from the sidecar
        assert await a.expire() == []
        await settle()
        entry = await store.get(f"{PREFIX}orders/n1")
        assert entry is not None and Registration.load(entry.value).replica == "B"
        assert a.endpoints() == b.endpoints() == {"orders": ["10.0.0.1:15006"]}

        clock.advance(11)  # now B's grace is over too: B deletes it, and A's view follows
        assert [r.replica for r in await b.expire()] == ["B"]
        await settle()
        assert a.registrations() == b.registrations() == []
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await store.close()


async def test_an_unchanged_registration_is_written_again_when_another_replica_holds_it(
        tmp_path: Path) -> None:
    store = await DirectoryStore.open(tmp_path / "store")
    a = Registry(store, 10.0, lambda: None, ephemeral=True)
    b = Registry(store, 10.0, lambda: None, ephemeral=True)
    view = StoreView(store, (PREFIX,), b.on_store)
    await view.load()
    task = asyncio.create_task(view.run())
    try:
        await a.register(reg("X"))
        await settle()
        before = (await store.get(f"{PREFIX}orders/n1"))
        await b.register(reg("X"))  # same state, but B does not own it: B must take it over
        after = await store.get(f"{PREFIX}orders/n1")
        assert before is not None and after is not None and after.revision > before.revision
        assert b.heard_from("orders", "n1")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()
