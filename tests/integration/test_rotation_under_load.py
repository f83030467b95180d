"""``pakectl certs rotate`` and ``certs rotate --ca`` with REAL sidecars under steady load.

The mesh of tests/integration/test_sidecar_control.py (a frontend sidecar calling orders over
mTLS, orders in front of a real upstream app), joined to one ``pakectl serve``. Load runs
through the frontend the whole time; both rotations run; not one request fails. After
``--ca`` every sidecar serves a certificate that the new root signed, and trusts the new
root alone: in memory (admin /config) and on disk (what a restart would serve with).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
from cryptography.hazmat.primitives.serialization import Encoding

from certs import pem
from sidecar.discovery.protocol import fingerprint_der
from tests.helpers.control_process import ControlProcess
from tests.helpers.sidecar_process import JoinedSidecarProcess
from tests.helpers.upstreams import RecordingUpstream
from tests.integration.test_sidecar_control import Load, admin, apply, frontend_sidecar, mesh, orders_sidecar


async def identity(sc: JoinedSidecarProcess) -> dict[str, Any]:
    """What the sidecar serves with (admin /config) and what it keeps on disk."""
    _, config = await admin(sc, "/config")
    leaf = pem.load_certificate(sc.state_dir / "cert.pem")
    roots = pem.parse_certificates((sc.state_dir / "bundle.pem").read_bytes(), "bundle.pem")
    return {"serial": config["tls"]["serial"], "bundle": config["tls"]["bundle"],
            "disk_serial": format(leaf.serial_number, "x"), "disk_roots": roots, "leaf": leaf}


def fingerprint(cert: Any) -> str:
    return fingerprint_der(cert.public_bytes(Encoding.DER))


async def test_rotating_certificates_and_the_ca_under_load_fails_no_request(tmp_path: Path) -> None:
    cp = await ControlProcess(tmp_path / "control", "--heartbeat-interval", "1s").start()
    sidecars: list[JoinedSidecarProcess] = []
    try:
        async with RecordingUpstream() as app:
            orders = await orders_sidecar(tmp_path, [cp.listen], await cp.token("orders"), app.address).start()
            sidecars.append(orders)
            frontend = await frontend_sidecar(tmp_path, cp, await cp.token("frontend")).start()
            sidecars.append(frontend)
            v1 = await apply(cp, tmp_path, mesh())
            for sc in sidecars:
                await sc.wait_config(f"{v1}.")
            await frontend.wait_endpoints("orders")
            before = {sc.bootstrap["service"]: await identity(sc) for sc in sidecars}

            load = Load(frontend.url())
            async with load.running():
                await load.until(20)
                rotate = await cp.pakectl("certs", "rotate", "--timeout", "20s")
                assert rotate.code == 0 and "renewed 2 of 2" in rotate.stdout, (rotate.stdout, rotate.stderr)
                await load.until(20)

                # At once: the sidecars were just asked for a CSR (by ``certs rotate``), and
                # were asked again all the same for one from the new root.
                result = await cp.pakectl("certs", "rotate", "--ca", "--json", "--timeout", "10s")
                assert result.code == 0, (result.stdout, result.stderr)
                summary = json.loads(result.stdout)
                assert summary["ok"], summary
                new = summary["new_fingerprint"]
                await load.until(50)
            assert not load.failures, load.failures[:5]
            print(f"requests: {load.ok} ok, 0 failed, through certs rotate and certs rotate --ca")

            for sc in sidecars:
                old, now = before[sc.bootstrap["service"]], await identity(sc)
                assert now["serial"] == now["disk_serial"] != old["serial"]
                [root] = now["disk_roots"]
                assert fingerprint(root) == new and new not in [fingerprint(r) for r in old["disk_roots"]]
                assert [b.replace(":", "").lower() for b in now["bundle"]] == [new]
                now["leaf"].verify_directly_issued_by(root)  # chains to the new root
            # New connections, made with only the new root on both sides: the frontend
            # restarted from its state directory calls orders, over mTLS, at once.
            await frontend.stop()
            frontend = await frontend_sidecar(tmp_path, cp, None).start()
            sidecars.append(frontend)
            load = Load(frontend.url())
            async with load.running():
                await load.until(20)
            assert not load.failures, load.failures[:5]
    finally:
        for sc in sidecars:
            await sc.stop()
        await cp.stop()
