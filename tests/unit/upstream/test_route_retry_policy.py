"""A route's retry rules and budget, as the cluster hands them out: a route that sets a budget
has budget state of its own, which outlives a reload that leaves it unchanged; a route without
one shares its service's. (No sockets: building clusters opens no connection.)"""

from __future__ import annotations

import asyncio
from typing import Any

from sidecar.config.load import parse_mesh
from sidecar.config.model import MeshConfig, RouteConfig
from sidecar.upstream.cluster_manager import ClusterManager

NOW = 1000.0


def mesh(own_budget: Any = "50%") -> MeshConfig:
    return parse_mesh({"services": {"orders": {
        "endpoints": ["127.0.0.1:9"],
        "routes": [
            {"name": "own", "match": {"path_prefix": "/own"},
             "retries": {"attempts": 2, "budget": own_budget}},
            {"name": "shared", "match": {"path_prefix": "/shared"}, "retries": {"attempts": 2}},
            {"name": "default"},
        ],
    }}})


def routes(config: MeshConfig) -> dict[str, RouteConfig]:
    return {r.name: r for r in config.services["orders"].routes}


async def test_a_route_budget_is_its_own_and_survives_an_unchanged_reload() -> None:
    manager = ClusterManager(asyncio.get_running_loop())
    first = mesh()
    manager.activate(manager.build(first, None, None))
    cluster = manager.clusters["orders"]
    by_name = routes(first)
    own, shared = cluster.retry_policy(by_name["own"]), cluster.retry_policy(by_name["shared"])
    assert cluster.retry_policy(by_name["default"]) is cluster.retry
    assert shared.budget is cluster.retry.budget
    assert own.budget is not cluster.retry.budget and own.budget.percent == 0.5
    assert cluster.retry_policy(by_name["own"]) is own  # made once, not per request
    own.record_request(NOW)
    assert own.budget.try_spend(NOW)

    same = mesh()
    manager.activate(manager.build(same, None, None))  # a reload that changes nothing
    again = manager.clusters["orders"].retry_policy(routes(same)["own"])
    assert again.config is routes(same)["own"].retries
    assert again.budget is own.budget and again.budget.snapshot(NOW)["retries"] == 1

    changed = mesh("10%")
    manager.activate(manager.build(changed, None, None))  # the route's budget changed: fresh state
    fresh = manager.clusters["orders"].retry_policy(routes(changed)["own"])
    assert fresh.budget is not own.budget and fresh.budget.snapshot(NOW)["retries"] == 0
    await manager.close()
