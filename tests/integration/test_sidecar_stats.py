"""Joined sidecars report their traffic to a real ``pakectl serve``: real processes, real mTLS,
every port 0. The frontend sidecar (the caller) sends its counts per route and destination with
its heartbeats; the orders sidecar sends the calls its policy refused. What an operator reads,
``pakectl top --json`` and ``/api/stats``, must show the exact counts and the denial."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.helpers.control_process import ControlProcess
from tests.helpers.sidecar_process import JoinedSidecarProcess
from tests.helpers.upstreams import RecordingUpstream

MESH = {"services": {
    "orders": {"policy": {"default": "deny",
                          "rules": [{"allow": {"from": ["frontend"], "paths": ["/orders/*"]}}]}},
    "frontend": {},
}}


async def stats_when(cp: ControlProcess, ready: Any, timeout: float = 10.0) -> dict[str, Any]:
    """``/api/stats`` once ``ready(sample)`` holds (the sidecars report once a heartbeat)."""
    sample: dict[str, Any] = {}
    async with aiohttp.ClientSession() as http:
        try:
            async with asyncio.timeout(timeout):
                while True:
                    async with http.get(f"http://{cp.admin}/api/stats") as r:
                        sample = await r.json()
                    if ready(sample):
                        return sample
                    await asyncio.sleep(0.1)
        except TimeoutError:
            raise AssertionError(f"/api/stats never got there: {sample}") from None


def route_row(sample: dict[str, Any]) -> dict[str, Any] | None:
    return next((r for r in sample["routes"] if (r["source"], r["route"], r["destination"])
                 == ("frontend", "orders/default", "orders")), None)  # (orders' own default route)


async def test_traffic_and_denials_reach_pakectl_top(tmp_path: Path) -> None:
    async with ControlProcess(tmp_path / "control", "--heartbeat-interval", "200ms") as cp, \
            RecordingUpstream() as app:
        orders = JoinedSidecarProcess(tmp_path, service="orders", addresses=[cp.listen],
                                      token=await cp.token("orders"), app=app.address,
                                      listeners={"inbound": {"address": "127.0.0.1:0", "tls": True},
                                                 "admin": "127.0.0.1:0"})
        frontend = JoinedSidecarProcess(tmp_path, service="frontend", addresses=[cp.listen],
                                        token=await cp.token("frontend"),
                                        listeners={"outbound": "127.0.0.1:0", "admin": "127.0.0.1:0"})
        async with orders, frontend:
            (tmp_path / "mesh.yaml").write_text(yaml.safe_dump(MESH))
            result = await cp.pakectl("apply", "-f", str(tmp_path / "mesh.yaml"))
            assert result.code == 0, result.stderr
            await orders.wait_config()
            await frontend.wait_config()
            await frontend.wait_endpoints("orders")
            statuses = []
            async with aiohttp.ClientSession() as http:
                for i in range(25):
                    async with http.get(f"{frontend.url()}/orders/{i}", headers={"host": "orders"}) as r:
                        statuses.append(r.status)
                async with http.get(f"{frontend.url()}/admin/users/alice", headers={"host": "orders"}) as r:
                    statuses.append(r.status)  # refused by orders' policy: a denial
            assert statuses == [200] * 25 + [403]

            sample = await stats_when(cp, lambda s: (route_row(s) or {}).get("requests") == 26
                                      and s["denials"])
            row = route_row(sample)
            assert row is not None
            assert (row["requests"], row["errors"], row["breaker"]) == (26, 0, "closed")
            assert row["p50"] is not None and row["p99"] is not None  # the latency histogram came too
            [service] = [s for s in sample["services"] if s["service"] == "orders"]
            assert service["requests"] == 26  # counted once: the caller reports, not the callee too
            [denial] = sample["denials"]
            assert (denial["service"], denial["flag"], denial["status"], denial["method"], denial["path"]) == (
                "orders", "RBAC", 403, "GET", "/admin/users/alice")
            assert denial["source"] == "spiffe://pake.local/service/frontend"

            top = await cp.pakectl("top", "--json", "--admin", cp.admin)
            assert top.code == 0, top.stderr
            shown = json.loads(top.stdout)
            row = route_row(shown)
            assert row is not None and (row["requests"], row["errors"]) == (26, 0)
            assert [(d["service"], d["flag"]) for d in shown["denials"]] == [("orders", "RBAC")]
