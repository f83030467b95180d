"""`pakectl serve` as a real process, driven by the `pakectl` CLI as an operator would:
tokens, joins, apply (and its refusal), status with a NACK, history, rollback, get, check,
certs rotate, then a restart that keeps config, history, tokens and the registry."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.helpers.control_process import ControlProcess
from tests.helpers.mesh_client import MeshClient, endpoints_of

MESH = {
    "services": {
        "orders": {"policy": {"default": "deny", "rules": [{"allow": {"from": ["frontend"]}}]}},
        "frontend": {"routes": [{"to": [{"service": "orders"}]}]},
    }
}


async def test_lifecycle_with_the_cli_and_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    mesh_file = tmp_path / "mesh.yaml"
    mesh_file.write_text(yaml.safe_dump(MESH))
    cp = ControlProcess(state)
    await cp.start()
    try:
        orders = MeshClient(tmp_path, cp.listen, service="orders", address="127.0.0.1:16001",
                            refuse=lambda s: "refused by test" if s.version.startswith("3.") else None)
        frontend = MeshClient(tmp_path, cp.listen, service="frontend", address=None)
        await orders.join(await cp.token("orders"))
        await frontend.join(await cp.token("frontend", "--ttl", "10m", "--uses", "2"))
        await orders.connect()
        await frontend.connect()

        dry = await cp.pakectl("apply", "-f", str(mesh_file), "--dry-run")
        assert dry.code == 0 and "+services:" in dry.stdout
        applied = await cp.pakectl("apply", "-f", str(mesh_file))
        assert (applied.code, applied.stdout) == (0, "applied version 1 (2 services)\n")
        # orders' hello may reach the plane after the apply (connect() does not wait for it):
        # version 1 is pushed again once orders registers, and that push lists its endpoint
        snap = await frontend.wait_snapshot(lambda s: s.version.startswith("1.") and bool(endpoints_of(s, "orders")))
        assert endpoints_of(snap, "orders") == ["127.0.0.1:16001"]

        # apply's own validation: every error with its path, nothing applied, exit 1.
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump({"services": {"orders": {"routes": [{"to": [{"service": "nope"}]}],
                                                              "timeouts": {"route": "soon"}}}}))
        refused = await cp.pakectl("apply", "-f", str(bad))
        assert refused.code == 1
        assert f"{bad}: services.orders.routes[0].to[0].service: unknown service 'nope'" in refused.stderr
        assert f"{bad}: services.orders.timeouts.route: must be a duration" in refused.stderr

        # Versions 2 (orders allows all) and 3 (which the orders sidecar NACKs).
        for default in ("allow", "deny"):
            mesh = {"services": {**MESH["services"], "orders": {"policy": {"default": default}}}}
            mesh_file.write_text(yaml.safe_dump(mesh))
            assert (await cp.pakectl("apply", "-f", str(mesh_file))).code == 0
        await orders.wait_snapshot(lambda s: s.version.startswith("3."))
        await cp.wait_for_event("nack")
        status = await cp.pakectl("status")
        assert status.code == 0
        row = next(line for line in status.stdout.splitlines() if line.startswith("orders"))
        assert " stale " in row and " 2." in row
        assert "orders/node-1: NACK of 3." in status.stdout and "refused by test" in status.stdout
        check = await cp.pakectl("check")
        assert check.code == 1 and "✘ stale (NACKed the latest version): orders/node-1: refused by test" in check.stdout
        assert "✔ CA valid for" in check.stdout

        history = await cp.pakectl("history")
        assert [line.split()[0] for line in history.stdout.splitlines()[1:]] == ["1", "2", "3"]
        rolled = await cp.pakectl("rollback", "2")
        assert rolled.stdout == "rolled back to version 2: applied as version 4\n"
        await orders.wait_snapshot(lambda s: s.version.startswith("4."))
        await cp.wait_for_event("ack", where=lambda e: e["service"] == "orders" and e["version"].startswith("4."))
        assert (await cp.pakectl("check")).code == 0
        policies = await cp.pakectl("get", "policies")
        assert yaml.safe_load(policies.stdout) == {"orders": {"default": "allow"}}

        rotate = await cp.pakectl("certs", "rotate", "--timeout", "10s")
        assert rotate.code == 0, rotate.stdout
        assert "renewed 2 of 2" in rotate.stdout and "[##############################] 2/2" in rotate.stdout

        held = orders.held_version
        await orders.close()
        await frontend.close()
        assert await cp.stop() == 0
    finally:
        if cp.proc is not None and cp.proc.returncode is None:
            await cp.stop()

    # Restart: config, history, tokens, CA and registry are all still there.
    async with ControlProcess(state) as again:
        assert not again.events("ca_created")
        status = json.loads((await again.pakectl("status", "--json")).stdout)
        assert status["config_version"] == 4
        assert {(s["service"], s["state"]) for s in status["sidecars"]} == {
            ("orders", "disconnected"), ("frontend", "disconnected")}
        tokens = (await again.pakectl("token", "list")).stdout
        assert "frontend  valid" in tokens and "orders    used up" in tokens
        # The orders sidecar reconnects holding version 4: nothing to resend, it is acked.
        before = len(orders.snapshots)
        orders.listen = frontend.listen = again.listen
        await orders.connect()
        frontend.held_version = None
        await frontend.connect()
        await frontend.wait_snapshot(lambda s: s.version.startswith("4."))
        await again.wait_for_event("ack", where=lambda e: e["service"] == "frontend")
        status = json.loads((await again.pakectl("status", "--json")).stdout)
        states = {s["service"]: (s["state"], s["held_version"]) for s in status["sidecars"]}
        assert states["orders"] == ("acked", held)
        assert len(orders.snapshots) == before
        await orders.close()
        await frontend.close()
