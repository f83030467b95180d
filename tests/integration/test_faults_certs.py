"""The fault suite (issue 12), certificates: expiry raises an alarm before and fails closed
after; ``pakectl certs rotate`` and ``certs rotate --ca`` under load fail no request.

Expiry: two static-mode sidecars (frontend -> echo over mTLS, a new connection per request so
every request is a full handshake). Echo's certificate is replaced by one with a few seconds of
life left: ``pake_tls_certificate_expiring`` goes to 1 (below
``pake_tls_certificate_expiry_alarm_seconds``, a sixth of the life) while traffic still flows;
once it has expired the frontend refuses the handshake, so requests get a 503, never a 200
from a peer with an expired certificate.

Rotation: a real ``pakectl serve`` and two joined sidecars under steady load.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp

from tests.helpers.control_process import ControlProcess
from tests.helpers.pki import make_test_pki
from tests.helpers.upstreams import RecordingUpstream
from tests.integration.test_control_ca_rotation import joined, start, write_mesh
from tests.integration.test_mtls import inbound_sidecar, metrics, outbound_sidecar
from tests.integration.test_sidecar_control import (Load, apply, frontend_sidecar, mesh,
                                                    orders_sidecar)

LEFT = 3.0  # seconds of life the near-expiry certificate has when it is installed


async def test_an_expiring_certificate_alarms_then_fails_closed(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path / "pki", services=["echo", "frontend"])
    async with RecordingUpstream() as app, \
            inbound_sidecar(tmp_path, pki.services["echo"], app.address) as echo:
        services = {"echo": {"endpoints": [f"127.0.0.1:{echo.ports['inbound']}"], "pool": {"max_idle": 0},
                             "retries": {"attempts": 0}, "breaker": {"consecutive_failures": 0},
                             "outlier": {"consecutive_5xx": 0}}}
        async with outbound_sidecar(tmp_path, pki.services["frontend"], services) as front, \
                aiohttp.ClientSession() as http:

            async def get() -> tuple[int, str]:
                async with http.get(front.url() + "/x", headers={"Host": "echo"}) as r:
                    await r.read()
                    return r.status, r.headers.get("x-pake-flags", "")

            fresh = await metrics(echo)
            assert await get() == (200, "")
            # 2 min of life (1 + the CA's minute of skew) of which LEFT remain: below a sixth
            life = timedelta(seconds=60)
            issued_at = datetime.now(UTC) - life + timedelta(seconds=LEFT)
            pki.issue("echo", ttl=life, now=issued_at)
            expires = time.monotonic() + LEFT
            await echo.wait_for_event("tls_reloaded")
            alarmed = await metrics(echo)
            before = await get()
            await asyncio.sleep(max(0.0, expires - time.monotonic()) + 0.5)  # the expiry under test
            after = [await get() for _ in range(3)]
            refused = await metrics(front)

    assert fresh["pake_tls_certificate_expiring"] == 0
    # a sixth of the life, which starts a minute early (the CA's allowance for clock skew)
    assert fresh["pake_tls_certificate_expiry_alarm_seconds"] == (3600 + 60) / 6
    assert fresh["pake_tls_certificate_expiry_seconds"] > 3000
    assert alarmed["pake_tls_certificate_expiring"] == 1
    assert alarmed["pake_tls_certificate_expiry_alarm_seconds"] == (60 + 60) / 6
    assert 0 < alarmed["pake_tls_certificate_expiry_seconds"] <= LEFT
    assert before == (200, "")  # alarmed, but still valid: traffic flows
    assert all(status == 503 for status, _ in after), after  # expired: fail closed
    client_failures = {k: v for k, v in refused.items()
                       if k.startswith("pake_tls_handshake_failures_total") and 'side="client"' in k}
    assert sum(client_failures.values()) >= 3, refused
    assert app.requests == 2  # nothing reached the app through an expired certificate


async def test_cert_and_ca_rotation_under_load_fail_no_request(tmp_path: Path) -> None:
    cp = await ControlProcess(tmp_path / "control").start()
    try:
        async with RecordingUpstream() as app:
            orders = await orders_sidecar(tmp_path, [cp.listen], await cp.token("orders"), app.address).start()
            frontend = await frontend_sidecar(tmp_path, cp, await cp.token("frontend")).start()
            try:
                version = await apply(cp, tmp_path, mesh())
                await orders.wait_config(f"{version}.")
                await frontend.wait_config(f"{version}.")
                await frontend.wait_endpoints("orders")
                load = Load(frontend.url())
                async with load.running(workers=4):
                    await load.until(20, timeout=30)
                    rotate = await cp.pakectl("certs", "rotate", "--timeout", "20s", timeout=60)
                    assert rotate.code == 0 and "renewed 2 of 2" in rotate.stdout, rotate.stdout
                    await load.until(20, timeout=30)
                    ca = await cp.pakectl("certs", "rotate", "--ca", "--json", "--timeout", "20s", timeout=90)
                    assert ca.code == 0, (ca.stdout, ca.stderr)
                    assert json.loads(ca.stdout)["ok"]
                    await load.until(20, timeout=30)
                # the sidecars hold certificates from the new root, and still talk to each other
                async with aiohttp.ClientSession() as http:
                    async with http.get(frontend.admin + "/config") as r:
                        tls = (await r.json())["tls"]
            finally:
                await frontend.stop()
                await orders.stop()
    finally:
        await cp.stop()
    assert not load.failures, load.failures[:5]
    assert load.ok >= 60
    print(f"requests: {load.ok} ok, 0 failed through certs rotate and certs rotate --ca")
    assert tls["spiffe_id"] == "spiffe://pake.local/service/frontend"


async def test_a_ca_rotation_right_after_certs_rotate_reissues_every_certificate(tmp_path: Path) -> None:
    """The reissue phase's nudge skipped a sidecar asked for a CSR under 2 s before (by the
    ``certs rotate`` just run) and nobody asked again: the rotation waited out its timeout."""
    cp = await start(tmp_path)
    try:
        assert (await cp.pakectl("apply", "-f", str(write_mesh(tmp_path)))).code == 0
        clients = [await joined(cp, tmp_path, "orders", "o1"), await joined(cp, tmp_path, "frontend", "f22")]
        for client in clients:
            await client.wait_snapshot()
        rotate = await cp.pakectl("certs", "rotate", "--timeout", "10s")
        ca = await cp.pakectl("certs", "rotate", "--ca", "--json", "--timeout", "8s", timeout=60)
        for client in clients:
            await client.close()
    finally:
        await cp.stop()
    assert rotate.code == 0 and "renewed 2 of 2" in rotate.stdout, rotate.stdout
    assert ca.code == 0 and json.loads(ca.stdout)["ok"], (ca.stdout, ca.stderr)
