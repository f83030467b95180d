"""A route's own retry budget is honoured (issue 8): ``retries.budget`` on a route was accepted
by ``pake-sidecar check`` and then ignored, the service's budget applying instead.

One real sidecar; the service's budget allows no retry at all, one route sets a budget of its
own that does, one route has its own retry rules without a budget (so it shares the
service's), and the default route uses the service's rules. The one endpoint answers 503 (a
retriable status), and what it saw (``x-pake-attempts``) tells which requests were retried.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp

from tests.helpers.flaky_upstream import FlakyUpstream, Reply, Request
from tests.helpers.sidecar_process import SidecarProcess

BOOT = {"service": "client"}
NO_BUDGET = {"percent": "0%", "min_retries": 0}


def unavailable(request: Request) -> Reply:
    return Reply(503, (), b"down")


async def test_a_route_with_its_own_budget_gets_its_own_budget_state(tmp_path: Path) -> None:
    async with FlakyUpstream(unavailable) as up:
        mesh = {"services": {"orders": {
            "endpoints": [up.address],
            "retries": {"attempts": 1, "budget": NO_BUDGET},
            "breaker": {"consecutive_failures": 0},  # 503s must not trip it: not under test
            "outlier": {"consecutive_5xx": 0},
            "routes": [
                {"name": "own", "match": {"path_prefix": "/own"},
                 "retries": {"attempts": 1, "budget": "100%"}},
                {"name": "shared", "match": {"path_prefix": "/shared"},
                 "retries": {"attempts": 1}},
                {"name": "default", "match": {"path_prefix": "/"}},
            ],
        }}}
        async with SidecarProcess(tmp_path, bootstrap=BOOT, mesh=mesh) as sc, \
                aiohttp.ClientSession() as http:
            for path in ("/own/1", "/shared/1", "/plain/1", "/own/2", "/shared/2", "/plain/2"):
                async with http.get(sc.url("outbound") + path, headers={"Host": "orders"}) as r:
                    assert r.status == 503
            async with http.get(sc.admin + "/clusters") as r:
                [orders] = [c for c in (await r.json())["clusters"] if c["name"] == "orders"]

    tries = {path: [r.attempt for r in up.requests if r.path == path]
             for path in ("/own/1", "/own/2", "/shared/1", "/shared/2", "/plain/1", "/plain/2")}
    assert tries == {
        "/own/1": [1, 2], "/own/2": [1, 2],  # the route's budget allows the retry
        "/shared/1": [1], "/shared/2": [1],  # no budget of its own: the service's allows none
        "/plain/1": [1], "/plain/2": [1],
    }
    assert orders["route_retry_budgets"]["own"]["retries"] == 2
    assert "shared" not in orders["route_retry_budgets"]
    assert orders["retry_budget"]["exhausted"] == 4
