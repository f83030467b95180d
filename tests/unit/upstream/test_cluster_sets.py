"""ClusterManager across snapshots: what a new set shares with the live ones, and when the
pools and health checkers of a superseded set are let go (no sockets: nothing connects)."""

from __future__ import annotations

import asyncio
from typing import Any

from sidecar.config.load import parse_mesh
from sidecar.upstream.cluster_manager import ClusterManager, ClusterSet


def mesh(endpoints: dict[str, list[str]], health: bool = False) -> Any:
    check = {"health_check": {"path": "/h", "interval": "1h"}} if health else {}
    return parse_mesh({"services": {name: {"endpoints": eps, **check} for name, eps in endpoints.items()}})


def swap(manager: ClusterManager, endpoints: dict[str, list[str]], health: bool = False) -> ClusterSet:
    new = manager.build(mesh(endpoints, health), None, None)
    manager.activate(new)
    return new


async def test_an_unchanged_pool_carries_over_and_a_dropped_one_waits_for_its_last_exchange() -> None:
    manager = ClusterManager(asyncio.get_running_loop())
    first = swap(manager, {"a": ["127.0.0.1:1"], "b": ["127.0.0.1:2"]})
    a_pool, b_pool = first.get("a").pools[("127.0.0.1", 1)], first.get("b").pools[("127.0.0.1", 2)]  # type: ignore[union-attr]
    first.hold()  # an exchange still runs under the first snapshot
    second = swap(manager, {"a": ["127.0.0.1:1"]})
    assert second.get("a").pools[("127.0.0.1", 1)] is a_pool  # type: ignore[union-attr]
    assert not b_pool.closed and manager.retiring == {first}
    first.release()
    assert b_pool.closed and not a_pool.closed and not manager.retiring
    assert manager.live_pools() == 1
    await manager.close()
    assert a_pool.closed


async def test_a_pool_shared_by_two_retiring_sets_closes_after_both() -> None:
    manager = ClusterManager(asyncio.get_running_loop())
    first = swap(manager, {"a": ["127.0.0.1:1"]})
    pool = first.get("a").pools[("127.0.0.1", 1)]  # type: ignore[union-attr]
    first.hold()
    second = swap(manager, {"a": ["127.0.0.1:1"], "b": ["127.0.0.1:2"]})
    second.hold()
    swap(manager, {"b": ["127.0.0.1:2"]})  # drops a's pool
    second.release()
    assert not pool.closed  # the first snapshot's exchange may still use it
    first.release()
    assert pool.closed and not manager.retiring and manager.live_pools() == 1
    await manager.close()


async def test_health_checkers_of_retired_sets_stop_and_carried_ones_keep_running() -> None:
    manager = ClusterManager(asyncio.get_running_loop())
    first = swap(manager, {"a": ["127.0.0.1:1"], "b": ["127.0.0.1:2"]}, health=True)
    a_check, b_check = first.get("a").health, first.get("b").health  # type: ignore[union-attr]
    for _ in range(50):
        swap(manager, {"a": ["127.0.0.1:1"], "b": ["127.0.0.1:3"]}, health=True)
        swap(manager, {"a": ["127.0.0.1:1"], "b": ["127.0.0.1:2"]}, health=True)
    assert manager.current.get("a").health is a_check  # type: ignore[union-attr]
    assert manager.current.get("b").health is b_check  # same config: carried over, one task
    await manager.settled()
    names = [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("health_check:")]
    assert sorted(names) == ["health_check:a", "health_check:b"]
    assert manager.live_pools() == 2 and manager.live_health_checkers() == 2
    await manager.close()
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("health_check:")]
