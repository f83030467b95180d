"""Sidecars joined to a real ``pakectl serve``: real processes, real mTLS, every port 0.

The lifecycle an operator lives through, in order: tokens → two sidecars join → apply →
traffic over mTLS between the sidecars → a config the sidecar refuses is NACKed (status shows
it, the old one keeps serving) → the control plane dies, traffic keeps flowing, and a sidecar
restarted meanwhile serves from its state directory → the control plane comes back and a new
apply reaches the sidecars → ``certs rotate`` and short-lived certificates renewing by
themselves under steady traffic, with zero failed requests → rollback.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from certs import pem
from certs.describe import describe_certificate
from certs.memory_source import PemMaterial
from sidecar.discovery.state import HeldSnapshot, StateDir

from tests.helpers.control_process import ControlProcess
from tests.helpers.pki import make_test_pki
from tests.helpers.sidecar_process import JoinedSidecarProcess
from tests.helpers.upstreams import RecordingUpstream

_ROOT = Path(__file__).resolve().parents[2]

POLICY = {"default": "deny", "rules": [{"allow": {"from": ["frontend"]}}]}


def mesh(**orders: Any) -> dict[str, Any]:
    return {"services": {"orders": {"policy": POLICY, **orders},
                         "frontend": {"routes": [{"to": [{"service": "orders"}]}]}}}


async def apply(cp: ControlProcess, tmp_path: Path, config: dict[str, Any]) -> int:
    """``pakectl apply``; the version it applied."""
    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.safe_dump(config))
    result = await cp.pakectl("apply", "-f", str(path))
    assert result.code == 0, result.stderr
    return int(result.stdout.split()[2])  # "applied version N (...)"


async def admin(sc: JoinedSidecarProcess, path: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(sc.admin + path) as r:
        return r.status, await r.json()


def orders_sidecar(tmp_path: Path, addresses: list[str], token: str | None, app: str,
                   inbound: str = "127.0.0.1:0") -> JoinedSidecarProcess:
    return JoinedSidecarProcess(tmp_path, service="orders", addresses=addresses, token=token,
                                app=app, listeners={"inbound": {"address": inbound, "tls": True},
                                                    "admin": "127.0.0.1:0"})


def frontend_sidecar(tmp_path: Path, cp: ControlProcess, token: str | None) -> JoinedSidecarProcess:
    return JoinedSidecarProcess(tmp_path, service="frontend", addresses=[cp.listen], token=token,
                                listeners={"outbound": "127.0.0.1:0", "admin": "127.0.0.1:0"},
                                extra={"access_log": {"enabled": False}})


@dataclass
class Load:
    """Steady traffic through the frontend sidecar to orders, counting every outcome."""

    url: str
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def _worker(self, http: aiohttp.ClientSession) -> None:
        while not self._stop.is_set():
            try:
                async with http.get(self.url + "/orders/1", headers={"host": "orders"}) as r:
                    await r.read()
                    if r.status == 200:
                        self.ok += 1
                    else:
                        self.failures.append(f"{r.status} {r.headers.get('x-pake-flags', '')}")
            except aiohttp.ClientError as exc:
                self.failures.append(repr(exc))
            await asyncio.sleep(0.005)

    async def until(self, count: int, timeout: float = 10.0) -> None:
        """Wait until ``count`` more requests succeeded (proof that traffic flows)."""
        target = self.ok + count
        async with asyncio.timeout(timeout):
            while self.ok < target:
                await asyncio.sleep(0.02)

    @asynccontextmanager
    async def running(self, workers: int = 2) -> AsyncIterator[Load]:
        self._stop.clear()
        async with aiohttp.ClientSession() as http:
            tasks = [asyncio.create_task(self._worker(http)) for _ in range(workers)]
            try:
                yield self
            finally:
                self._stop.set()
                await asyncio.gather(*tasks)


async def get_orders(sc: JoinedSidecarProcess) -> int:
    async with aiohttp.ClientSession() as http, http.get(
            sc.url() + "/orders/1", headers={"host": "orders"}) as r:
        return r.status


async def test_joined_sidecars_through_the_whole_lifecycle(tmp_path: Path) -> None:
    state = tmp_path / "control"
    cp = await ControlProcess(state).start()
    orders: JoinedSidecarProcess | None = None
    frontend: JoinedSidecarProcess | None = None
    try:
        async with RecordingUpstream() as app:
            # orders knows two control-plane addresses, the first of which refuses connections
            # (a bound socket that never listens): it fails over to the second, for the join
            # and for the stream.
            with socket.socket() as dead:
                dead.bind(("127.0.0.1", 0))
                addresses = [f"127.0.0.1:{dead.getsockname()[1]}", cp.listen]
                orders = await orders_sidecar(tmp_path, addresses, await cp.token("orders"), app.address).start()
                await orders.wait_for_event("control_connected")
            assert orders.events("join_failed") and orders.events("control_reconnecting")
            frontend = await frontend_sidecar(tmp_path, cp, await cp.token("frontend")).start()
            # Joined, holding a certificate, but no config yet: not ready.
            code, ready = await admin(orders, "/readyz")
            assert (code, ready["config"], ready["certificate"]) == (503, False, True)
            for sc in (orders, frontend):
                key = sc.state_dir / "key.pem"
                assert stat.S_IMODE(key.stat().st_mode) == 0o600
                assert not (sc.dir / "state" / "next-key.pem").exists()

            v1 = await apply(cp, tmp_path, mesh())
            await orders.wait_config(f"{v1}.")
            await frontend.wait_config(f"{v1}.")
            await frontend.wait_endpoints("orders")
            code, ready = await admin(orders, "/readyz")
            assert code == 200 and ready["version"].startswith(f"{v1}.")
            _, config = await admin(frontend, "/config")
            assert config["origin"]["from"] == "control" and config["origin"]["where"] == cp.listen
            assert config["control"]["connected_to"] == cp.listen
            assert config["tls"]["spiffe_id"] == "spiffe://pake.local/service/frontend"

            load = Load(frontend.url())
            async with load.running():
                await load.until(20)
                # A config that apply accepts but the orders sidecar cannot build (its schema
                # file is not there): NACKed with the path-qualified error, the old one serves.
                bad = mesh(routes=[{"validation": {"json_schema": {"file": "missing.json"}}}])
                v2 = await apply(cp, tmp_path, bad)
                [nack] = await cp.wait_for_event("nack", where=lambda e: e["version"].startswith(f"{v2}."))
                assert nack["error"] == ("services.orders.routes[0].validation.json_schema.file: file not found: "
                                        f"{orders.state_dir / 'missing.json'}")
                status = json.loads((await cp.pakectl("status", "--json")).stdout)
                row = next(s for s in status["sidecars"] if s["service"] == "orders")
                assert row["state"] == "stale" and row["held_version"].startswith(f"{v1}.")
                assert row["last_nack"]["error"] == nack["error"]
                await load.until(20)
                _, config = await admin(orders, "/config")
                assert config["version"].startswith(f"{v1}.")

                # The control plane dies: traffic keeps flowing.
                listen_port = cp.ports["listen"]
                await cp.stop(signal.SIGKILL)
                await orders.wait_for_event("control_disconnected")
                await load.until(30)
            assert not load.failures, load.failures[:5]

            # A sidecar restarted while the control plane is down serves from its state dir:
            # snapshot, key and certificate (the used-up token is still in its join.token).
            await frontend.stop()
            frontend = await frontend_sidecar(tmp_path, cp, None).start()
            code, ready = await admin(frontend, "/readyz")
            assert code == 200, ready
            _, config = await admin(frontend, "/config")
            # (v2 was only refused by orders: the frontend acked it, and kept it)
            assert config["origin"]["from"] == "state_dir" and config["version"].startswith(f"{v2}.")
            assert await get_orders(frontend) == 200

            # The control plane comes back (short-lived certificates from now on) on the same
            # address; the sidecars reconnect and a new apply reaches them.
            cp = await ControlProcess(state, "--workload-ttl", "6s").start(listen_port=listen_port)
            await frontend.wait_for_event("control_connected")
            v3 = await apply(cp, tmp_path, mesh(timeouts={"route": "5s"}))
            await orders.wait_config(f"{v3}.")
            await frontend.wait_config(f"{v3}.")

            load = Load(frontend.url())
            async with load.running():
                await load.until(10)
                # certs rotate under load: every sidecar renews (new key, 6 s certificate).
                rotate = await cp.pakectl("certs", "rotate", "--timeout", "20s")
                assert rotate.code == 0 and "renewed 2 of 2" in rotate.stdout, rotate.stdout
                await load.until(10)
                # ... then they renew by themselves at 2/3 of the life (4 s), still under load.
                await orders.wait_for_event("certificate_installed", count=2, timeout=15)
                await frontend.wait_for_event("certificate_installed", count=2, timeout=15)
                await load.until(10)

                rolled = await cp.pakectl("rollback", str(v1))
                assert rolled.code == 0, rolled.stderr
                v4 = int(rolled.stdout.split()[-1])
                await orders.wait_config(f"{v4}.")
                await frontend.wait_config(f"{v4}.")
                await load.until(10)
            assert not load.failures, load.failures[:5]
            # What is on disk is the identity in force (a restart would serve with it).
            _, config = await admin(orders, "/config")
            held = pem.load_certificate(orders.state_dir / "cert.pem")
            assert config["tls"]["not_after"] == describe_certificate(held, datetime.now(UTC))["not_after"]
            print(f"requests: {load.ok} ok, 0 failed, through rotation, renewal and rollback")
    finally:
        for joined in (orders, frontend):
            if joined is not None:
                await joined.stop()
        if cp.proc is not None and cp.proc.returncode is None:
            await cp.stop()


def sidecar_check(config: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(_ROOT)}
    return subprocess.run([sys.executable, "-m", "sidecar", "check", "-c", str(config)], cwd=_ROOT,
                          env=env, capture_output=True, text=True, timeout=30)


def test_check_reads_the_token_until_joined_then_only_the_state_dir(tmp_path: Path) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text(yaml.safe_dump({
        "service": "orders", "app": "127.0.0.1:8080",
        "listeners": {"inbound": {"address": "127.0.0.1:0", "tls": True}, "admin": "127.0.0.1:0"},
        "control": {"addresses": ["127.0.0.1:15010"], "token_file": "join.token", "state_dir": "state"}}))
    token = tmp_path / "join.token"
    token.write_text(f"pake1.{'a1' * 8}.{'s' * 40}.{'f0' * 32}\n")
    result = sidecar_check(config)
    assert result.returncode == 0, result.stderr
    assert f"not joined yet, join token {'a1' * 8}" in result.stdout

    token.write_text("not-a-token\n")
    result = sidecar_check(config)
    assert result.returncode == 2 and result.stderr.startswith(f"pake-sidecar: {token}: join token: not a PAKE")

    # Joined: identity and last snapshot in the state dir; the token is never read again.
    token.unlink()
    state = StateDir(tmp_path / "state")
    state.prepare()
    issued = make_test_pki(tmp_path / "pki", services=()).issue("orders", out_dir=tmp_path / "issued")
    state.save_identity(PemMaterial(issued.cert.read_bytes(), issued.key.read_bytes(), issued.bundle.read_bytes()))
    state.save_snapshot(HeldSnapshot("3.abc", {"services": {"orders": {"timeouts": {"route": "soon"}}}},
                                     None, "127.0.0.1:15010", "2025-01-01T00:00:00Z"))
    result = sidecar_check(config)
    assert result.returncode == 2
    assert result.stderr == (f"pake-sidecar: {state.snapshot_path}: services.orders.timeouts.route: "
                             "must be a duration like 500ms or 1h30m, got 'soon'\n")
    state.save_snapshot(HeldSnapshot("3.abc", {"services": {"orders": {}}}, None, "127.0.0.1:15010",
                                     "2025-01-01T00:00:00Z"))
    result = sidecar_check(config)
    assert result.returncode == 0, result.stderr
    assert "joined as spiffe://pake.local/service/orders until" in result.stdout
    assert "snapshot version 3.abc, 1 services" in result.stdout
