"""The fault suite (issue 12), the control plane: routes that name clusters not yet known.

With this control plane a route and the cluster it names cannot arrive apart (as Envoy's RDS
may before CDS): a snapshot is one validated whole, and ``pakectl apply`` refuses a route to a
service the mesh does not define. What *can* arrive late is a service's endpoints, when its
sidecar joins after the route to it was applied. Under steady traffic to ``orders``:
1. an apply whose new route names an unknown service is refused with the path of the route,
   the version does not move, and no request fails;
2. the service defined, its sidecar not there yet: requests to it get the documented fast 503
   ``UH`` (no endpoint), never a 404 or a hang, and ``orders`` traffic is untouched;
3. its sidecar joins: the registry's endpoint reaches the frontend and requests succeed,
   still without one failed ``orders`` request.

Covered elsewhere, exactly (``test_sidecar_control.py::test_joined_sidecars_through_the_whole_lifecycle``,
under the same steady load with a zero-failure assertion): a bad config push (NACK with the
path-qualified reason, ``pakectl status`` shows the held version, ``/config`` unchanged), and
the control plane down (SIGKILLed; traffic unaffected; a sidecar restarted meanwhile serves
from its state directory's last good snapshot).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.helpers.control_process import ControlProcess
from tests.helpers.sidecar_process import JoinedSidecarProcess
from tests.helpers.upstreams import RecordingUpstream
from tests.integration.test_sidecar_control import (POLICY, Load, apply, frontend_sidecar,
                                                    orders_sidecar)


def mesh_with(payments: bool, route_to_payments: bool = True) -> dict[str, Any]:
    routes: list[dict[str, Any]] = [{"to": [{"service": "orders"}]}]
    if route_to_payments:
        routes.insert(0, {"match": {"path_prefix": "/pay/"}, "to": [{"service": "payments"}]})
    services: dict[str, Any] = {"orders": {"policy": POLICY}, "frontend": {"routes": routes}}
    if payments:
        services["payments"] = {"policy": POLICY}
    return {"services": services}


async def test_a_route_to_a_service_whose_endpoints_come_later_fails_no_other_request(tmp_path: Path) -> None:
    cp = await ControlProcess(tmp_path / "control").start()
    joined: list[JoinedSidecarProcess] = []
    try:
        async with RecordingUpstream() as orders_app, RecordingUpstream() as payments_app:
            orders = await orders_sidecar(tmp_path, [cp.listen], await cp.token("orders"), orders_app.address).start()
            frontend = await frontend_sidecar(tmp_path, cp, await cp.token("frontend")).start()
            joined += [orders, frontend]
            v1 = await apply(cp, tmp_path, mesh_with(payments=False, route_to_payments=False))
            await frontend.wait_config(f"{v1}.")
            await orders.wait_config(f"{v1}.")
            await frontend.wait_endpoints("orders")

            load = Load(frontend.url())
            async with load.running(), aiohttp.ClientSession() as http:

                async def pay() -> tuple[int, str]:
                    async with http.get(frontend.url() + "/pay/1", headers={"host": "payments"}) as r:
                        await r.read()
                        return r.status, r.headers.get("x-pake-flags", "")

                await load.until(20)
                # 1. a route naming a service the mesh does not define: refused whole
                bad = tmp_path / "bad.yaml"
                bad.write_text(yaml.safe_dump(mesh_with(payments=False)))
                refused = await cp.pakectl("apply", "-f", str(bad))
                status = await cp.pakectl("status")
                await load.until(20)

                # 2. defined, no endpoint yet
                v2 = await apply(cp, tmp_path, mesh_with(payments=True))
                await frontend.wait_config(f"{v2}.")
                early = [await pay() for _ in range(5)]
                await load.until(20)

                # 3. its sidecar joins; the endpoint reaches the frontend in a new snapshot
                payments = JoinedSidecarProcess(
                    tmp_path, service="payments", addresses=[cp.listen], token=await cp.token("payments"),
                    app=payments_app.address,
                    listeners={"inbound": {"address": "127.0.0.1:0", "tls": True}, "admin": "127.0.0.1:0"})
                await payments.start()
                joined.append(payments)
                await payments.wait_config(f"{v2}.")
                async with asyncio.timeout(10):
                    while (late := await pay())[0] != 200:
                        assert late == (503, "UH"), late
                        await asyncio.sleep(0.05)
                after = [await pay() for _ in range(5)]
                await load.until(20)
    finally:
        for sc in joined:
            await sc.stop()
        await cp.stop()

    assert refused.code != 0
    assert "services.frontend.routes[0].to[0].service" in refused.stderr, refused.stderr
    assert "payments" in refused.stderr
    # every sidecar still holds and acks v1: the refused apply made no version
    rows = [line.split() for line in status.stdout.splitlines() if "acked" in line]
    assert len(rows) == 2 and all(any(f.startswith(f"{v1}.") for f in row) for row in rows), status.stdout
    assert early == [(503, "UH")] * 5
    assert after == [(200, "")] * 5 and payments_app.requests >= 6
    assert not load.failures, load.failures[:5]
    assert load.ok >= 80
