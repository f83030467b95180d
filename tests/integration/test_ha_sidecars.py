"""Two ``pakectl serve`` replicas on one real etcd serve one mesh of REAL sidecars: killing the
replica the sidecars are connected to moves them to the other with no failed request.

The mesh: a frontend sidecar calling orders over mTLS, orders in front of a real upstream
app; each sidecar knows both replicas' addresses (the one to be killed first). Steady load
through the frontend the whole time; A is SIGKILLed (no goodbye, its lease expires on its
own); the sidecars reconnect to B, ``pakectl status`` on B shows them connected there, and an
apply through B reaches them. Not one request fails.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.helpers.control_process import ControlProcess
from tests.helpers.etcd import EtcdServer
from tests.helpers.sidecar_process import JoinedSidecarProcess
from tests.helpers.upstreams import RecordingUpstream
from tests.integration.test_control_ha import LEASE_TTL, running_replicas
from tests.integration.test_sidecar_control import Load, apply, mesh, orders_sidecar


@pytest.fixture
async def replicas(tmp_path: Path) -> AsyncIterator[tuple[ControlProcess, ControlProcess]]:
    async with EtcdServer(tmp_path) as etcd, running_replicas(tmp_path, etcd) as pair:
        yield pair


def frontend_sidecar(tmp_path: Path, addresses: list[str], token: str) -> JoinedSidecarProcess:
    return JoinedSidecarProcess(tmp_path, service="frontend", addresses=addresses, token=token,
                                listeners={"outbound": "127.0.0.1:0", "admin": "127.0.0.1:0"},
                                extra={"access_log": {"enabled": False}})


async def test_killing_the_replica_moves_its_sidecars_with_no_failed_request(
        replicas: tuple[ControlProcess, ControlProcess], tmp_path: Path) -> None:
    a, b = replicas
    addresses = [a.listen, b.listen]  # both sidecars start on A
    v1 = await apply(a, tmp_path, mesh())
    sidecars: list[JoinedSidecarProcess] = []
    try:
        async with RecordingUpstream() as app:
            orders = await orders_sidecar(tmp_path, addresses, await a.token("orders"), app.address).start()
            sidecars.append(orders)
            frontend = await frontend_sidecar(tmp_path, addresses, await a.token("frontend")).start()
            sidecars.append(frontend)
            for sc in sidecars:
                await sc.wait_config(f"{v1}.")
                [connected] = sc.events("control_connected")
                assert connected["address"] == a.listen
            await frontend.wait_endpoints("orders")

            load = Load(frontend.url())
            async with load.running():
                await load.until(20)
                await a.stop(signal.SIGKILL)
                killed_at = asyncio.get_running_loop().time()
                for sc in sidecars:
                    await sc.wait_for_event("control_connected", count=2, timeout=10)
                    assert sc.events("control_connected")[-1]["address"] == b.listen
                # B shows both connected to it (not "remote": their streams are B's own).
                status = json.loads((await b.pakectl("status", "--json")).stdout)
                rows = {s["service"]: s for s in status["sidecars"]}
                assert {name: (row["connected"], row["replica"], row["state"])
                        for name, row in rows.items()} == {
                    "orders": (True, b.listen, "acked"), "frontend": (True, b.listen, "acked")}
                # Load on past the expiry of A's lease (a wall-clock wait, the load runs
                # meanwhile): orders' endpoint is B's registration now, nobody loses it.
                await asyncio.sleep(LEASE_TTL + 0.5 - (asyncio.get_running_loop().time() - killed_at))
                await load.until(20)

                # A change through the survivor reaches both sidecars, traffic still flowing.
                v2 = await apply(b, tmp_path, mesh(timeouts={"route": "5s"}))
                for sc in sidecars:
                    await sc.wait_config(f"{v2}.")
                await load.until(20)
            assert not load.failures, load.failures[:5]
            assert load.ok >= 90
            print(f"requests: {load.ok} ok, 0 failed, across the loss of replica A")
    finally:
        for sc in sidecars:
            await sc.stop()
