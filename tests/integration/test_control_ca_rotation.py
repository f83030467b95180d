"""`pakectl certs rotate --ca` against a real `pakectl serve` with sidecar-like clients: the
overlap (new root in, certificates from it, old root out), and an interrupted rotation
(CLI and control plane killed mid-way) that continues when run again."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding

from certs import pem
from sidecar.discovery.protocol import bundle_fingerprints, fingerprint_der
from tests.helpers.control_process import ControlProcess
from tests.helpers.mesh_client import MeshClient

_ROOT = Path(__file__).resolve().parents[2]
MESH: dict[str, Any] = {"services": {"orders": {}, "frontend": {"routes": [{"to": [{"service": "orders"}]}]}}}


async def start(tmp_path: Path) -> ControlProcess:
    return await ControlProcess(tmp_path / "state", "--heartbeat-interval", "1s",
                                "--endpoint-grace", "30s").start()


async def joined(cp: ControlProcess, tmp_path: Path, service: str, node: str, **kwargs: Any) -> MeshClient:
    client = MeshClient(tmp_path, cp.listen, service=service, node=node,
                        address=f"10.0.0.{len(node)}:15006", failover=True, **kwargs)
    await client.join(await cp.token(service))
    await client.connect()
    return client


def root_of(client: MeshClient) -> str:
    """The fingerprint of the root in the client's bundle that signed its certificate."""
    leaf = client.certificate()
    for root in pem.parse_certificates((client.bundle or "").encode(), "bundle"):
        try:
            leaf.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return fingerprint_der(root.public_bytes(Encoding.DER))
    return "none"


async def test_rotating_the_ca_moves_every_sidecar_to_the_new_root(tmp_path: Path) -> None:
    cp = await start(tmp_path)
    try:
        assert (await cp.pakectl("apply", "-f", str(write_mesh(tmp_path)))).code == 0
        clients = [await joined(cp, tmp_path, "orders", "o1"), await joined(cp, tmp_path, "orders", "o22"),
                   await joined(cp, tmp_path, "frontend", "f333")]
        for c in clients:
            await c.wait_snapshot()
        old = bundle_fingerprints(clients[0].bundle or "")
        assert len(old) == 1

        result = await cp.pakectl("certs", "rotate", "--ca", "--json", "--timeout", "10s")
        assert result.code == 0, (result.stdout, result.stderr)
        summary = json.loads(result.stdout)
        new = summary["new_fingerprint"]
        assert summary["ok"] and new not in old
        # a line per phase, with counts
        for step, phase in enumerate(("bundle", "reissue", "trim"), 1):
            assert f"phase {step}/3 {phase}: " in result.stderr and ": 3/3 sidecars" in result.stderr

        for c in clients:
            assert bundle_fingerprints(c.bundle or "") == [new]  # only the new root
            assert root_of(c) == new  # a certificate from the new root
            assert c.certificate().not_valid_after_utc > c.certificate().not_valid_before_utc
        # The control plane itself is on the new root: a new stream verifies with the new
        # bundle alone, and a new token carries the new fingerprint and joins.
        await clients[0].close()
        await clients[0].connect()
        await clients[0].wait_for(lambda c: not c.closed and c.stream_opens == 2)
        late = await joined(cp, tmp_path, "orders", "o4444")
        assert root_of(late) == new
        _, status = await admin_status(cp)
        assert status["ca"]["fingerprint"] == new
        for c in (*clients, late):
            await c.close()
    finally:
        await cp.stop()


async def test_an_interrupted_rotation_continues_when_run_again(tmp_path: Path) -> None:
    cp = await start(tmp_path)
    try:
        assert (await cp.pakectl("apply", "-f", str(write_mesh(tmp_path)))).code == 0
        quick = await joined(cp, tmp_path, "orders", "o1")
        # This one does not answer renewals yet: the rotation stalls in phase 2.
        stuck = await joined(cp, tmp_path, "frontend", "f22", answer_renew=False)
        for c in (quick, stuck):
            await c.wait_snapshot()
        old = bundle_fingerprints(quick.bundle or "")

        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "control", "certs", "rotate", "--ca", "--timeout", "30s",
            "--admin", cp.admin, cwd=str(_ROOT), env={**os.environ, "PYTHONPATH": str(_ROOT)},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert cli.stdout is not None
        seen: list[str] = []
        async with asyncio.timeout(15):
            while not any(line.startswith("phase 2/3 reissue") for line in seen):
                seen.append((await cli.stdout.readline()).decode())
        cli.kill()  # the operator's terminal went away
        await cli.wait()
        assert seen[0].startswith("CA rotation starting: new root ")
        await quick.wait_for(lambda c: root_of(c) not in old, timeout=5)

        # ... and the control plane dies too, mid-rotation; it comes back on the same ports.
        ports = dict(cp.ports)
        await cp.stop(signal.SIGKILL)
        await cp.start(listen_port=ports["listen"], admin_port=ports["admin"])
        stuck.answer_renew = True
        for c in (quick, stuck):
            await c.wait_for(lambda c: c.stream_opens == 2, timeout=10)

        again = await cp.pakectl("certs", "rotate", "--ca", "--json", "--timeout", "10s")
        assert again.code == 0, (again.stdout, again.stderr)
        assert "CA rotation continuing at phase reissue" in again.stderr
        new = json.loads(again.stdout)["new_fingerprint"]
        assert seen[0].split("new root ")[1].startswith(new[:16])  # the same rotation
        for c in (quick, stuck):
            assert bundle_fingerprints(c.bundle or "") == [new]
            assert root_of(c) == new
        for c in (quick, stuck):
            await c.close()
    finally:
        await cp.stop()


def write_mesh(tmp_path: Path) -> Path:
    path = tmp_path / "mesh.yaml"
    path.write_text(json.dumps(MESH))  # JSON is YAML
    return path


async def admin_status(cp: ControlProcess) -> tuple[int, Any]:
    result = await cp.pakectl("status", "--json")
    return result.code, json.loads(result.stdout)
