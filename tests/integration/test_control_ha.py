"""Two `pakectl serve` replicas on one real etcd serve one mesh: changes through either reach
sidecars on both, a killed replica's sidecars' endpoints expire with its lease while a
sidecar that fails over is served by the other, concurrent applies cannot both win."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from control.etcd import EtcdClient
from tests.helpers.control_process import ControlProcess
from tests.helpers.etcd import EtcdServer
from tests.helpers.mesh_client import JoinError, MeshClient, endpoints_of

LEASE_TTL = 2  # seconds: the shortest the store takes, so expiry is quick

MESH: dict[str, Any] = {
    "services": {
        "orders": {},
        "frontend": {"routes": [{"to": [{"service": "orders"}]}]},
    }
}


@pytest.fixture
async def etcd(tmp_path: Path) -> AsyncIterator[EtcdServer]:
    async with EtcdServer(tmp_path) as server:
        yield server


def replica(tmp_path: Path, etcd: EtcdServer, name: str, *extra: str) -> ControlProcess:
    """A replica with its own state dir; the store key is the mesh's, shared by all."""
    return ControlProcess(
        tmp_path / name, "--store", f"etcd://127.0.0.1:{etcd.port}", "--lease-ttl", f"{LEASE_TTL}s",
        "--store-key-file", str(tmp_path / "store.key"), "--heartbeat-interval", "1s",
        "--endpoint-grace", "30s", *extra)


@asynccontextmanager
async def running_replicas(tmp_path: Path, etcd: EtcdServer) -> AsyncIterator[tuple[ControlProcess, ControlProcess]]:
    a, b = replica(tmp_path, etcd, "a"), replica(tmp_path, etcd, "b")
    try:
        # Started together: both find no CA in the store, exactly one import wins. (A task
        # group: when one fails to start, the other's start is cancelled and it is stopped
        # below, not left running after the test.)
        async with asyncio.TaskGroup() as starting:
            starting.create_task(a.start())
            starting.create_task(b.start())
        yield a, b
    finally:
        await asyncio.gather(*(cp.stop() for cp in (a, b) if cp.proc and cp.proc.returncode is None))


@pytest.fixture
async def replicas(tmp_path: Path, etcd: EtcdServer) -> AsyncIterator[tuple[ControlProcess, ControlProcess]]:
    async with running_replicas(tmp_path, etcd) as pair:
        yield pair


async def admin(cp: ControlProcess, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.request(method, f"http://{cp.admin}{path}", json=body) as r:
            return r.status, await r.json(content_type=None)


async def apply(cp: ControlProcess, mesh: dict[str, Any], **extra: Any) -> tuple[int, Any]:
    return await admin(cp, "POST", "/v1/config", {"mesh": mesh, "by": "test", **extra})


async def token(cp: ControlProcess, service: str, uses: int = 1) -> str:
    status, body = await admin(cp, "POST", "/v1/tokens", {"service": service, "uses": uses})
    assert status == 200, body
    return str(body["token"])


async def joined(cp: ControlProcess, tmp_path: Path, service: str, node: str, address: str,
                 **kwargs: Any) -> MeshClient:
    client = MeshClient(tmp_path, kwargs.pop("listen", cp.listen), service=service, node=node,
                        address=address, **kwargs)
    await client.join(await token(cp, service))
    await client.connect()
    return client


def has_endpoints(service: str, wanted: set[str]) -> Any:
    return lambda s: set(endpoints_of(s, service)) == wanted


async def test_replicas_serve_one_mesh(replicas: tuple[ControlProcess, ControlProcess],
                                       tmp_path: Path) -> None:
    a, b = replicas
    # One CA for the mesh: both replicas serve the same bundle, a token from A joins through B.
    assert (await admin(a, "GET", "/v1/status"))[1]["ca"]["fingerprint"] == \
        (await admin(b, "GET", "/v1/status"))[1]["ca"]["fingerprint"]
    assert (await apply(a, MESH))[0] == 200

    orders = await joined(a, tmp_path, "orders", "o1", "10.0.0.1:15006")  # on A
    frontend = MeshClient(tmp_path, b.listen, service="frontend", node="f1", address=None)
    await frontend.join(await token(a, "frontend"))  # token made on A, redeemed on B
    await frontend.connect()

    # A's registration reaches the sidecar on B, through B's watch.
    await frontend.wait_snapshot(has_endpoints("orders", {"10.0.0.1:15006"}))
    # An apply on A reaches the sidecar on B; an apply on B the sidecar on A.
    changed = {"services": {**MESH["services"], "orders": {"timeouts": {"route": "3s"}}}}
    status, body = await apply(a, changed)
    assert status == 200 and body["version"] == 2
    await frontend.wait_snapshot(lambda s: s.version.startswith("2."))
    assert (await apply(b, MESH))[0] == 200
    await orders.wait_snapshot(lambda s: s.version.startswith("3."))

    # A second orders sidecar on B: the one on A... and the frontend see both endpoints.
    orders2 = await joined(b, tmp_path, "orders", "o2", "10.0.0.2:15006")
    await frontend.wait_snapshot(has_endpoints("orders", {"10.0.0.1:15006", "10.0.0.2:15006"}))
    # status on either replica shows every sidecar, and which replica it is on.
    _, status_b = await admin(b, "GET", "/v1/status")
    where = {s["node"]: s.get("replica") for s in status_b["sidecars"]}
    assert where == {"o1": a.listen, "o2": b.listen, "f1": b.listen}

    # Token uses are counted in the store: a 1-use token redeemed through B is used up on A.
    once = await token(a, "orders")
    other = MeshClient(tmp_path, b.listen, service="orders", node="o3")
    await other.join(once)
    late = MeshClient(tmp_path, a.listen, service="orders", node="o4")
    with pytest.raises(JoinError, match="token_used_up"):
        await late.join(once)
    for client in (orders, orders2, frontend):
        await client.close()


async def test_a_killed_replicas_endpoints_expire_and_its_sidecars_fail_over(
        replicas: tuple[ControlProcess, ControlProcess], tmp_path: Path) -> None:
    a, b = replicas
    assert (await apply(a, MESH))[0] == 200
    gone = await joined(a, tmp_path, "orders", "gone", "10.0.0.1:15006")
    mover = await joined(a, tmp_path, "orders", "mover", "10.0.0.2:15006",
                         listen=[a.listen, b.listen], failover=True)
    watcher = await joined(b, tmp_path, "frontend", "f1", "10.0.0.9:15006")
    both = {"10.0.0.1:15006", "10.0.0.2:15006"}
    await watcher.wait_snapshot(has_endpoints("orders", both))
    gone.failover = False

    await a.stop(signal.SIGKILL)  # no goodbye: only its lease's expiry cleans up
    # The mover is on B within moments; B registers it under B's own lease.
    await mover.wait_for(lambda c: c.stream_opens == 2 and c.listen == b.listen, timeout=5)
    # The one that stayed behind expires from B's view after A's lease TTL, the mover stays.
    snap = await watcher.wait_snapshot(has_endpoints("orders", {"10.0.0.2:15006"}),
                                       timeout=LEASE_TTL + 3)
    assert endpoints_of(snap, "orders") == ["10.0.0.2:15006"]
    # The mover is served by B: a change applied now reaches it.
    assert (await apply(b, {"services": {**MESH["services"], "orders": {"timeouts": {"route": "2s"}}}}))[0] == 200
    await mover.wait_snapshot(lambda s: s.version.startswith("2."))
    _, status = await admin(b, "GET", "/v1/status")
    assert {(s["node"], s["connected"]) for s in status["sidecars"]} == {("mover", True), ("f1", True)}
    for client in (gone, mover, watcher):
        await client.close()


async def test_a_replica_whose_lease_is_lost_writes_its_registrations_again(
        replicas: tuple[ControlProcess, ControlProcess], etcd: EtcdServer, tmp_path: Path) -> None:
    a, b = replicas
    assert (await apply(a, MESH))[0] == 200
    orders = await joined(a, tmp_path, "orders", "o1", "10.0.0.1:15006")
    frontend = await joined(b, tmp_path, "frontend", "f1", "10.0.0.9:15006")
    await frontend.wait_snapshot(has_endpoints("orders", {"10.0.0.1:15006"}))
    client = EtcdClient(etcd.endpoints)
    try:
        kv = (await client.range(b"/pake/registry/orders/o1")).kvs[0]
        assert kv.lease != 0  # ephemeral: under A's lease
        await client.lease_revoke(kv.lease)  # as if etcd had expired it during a partition
        await a.wait_for_event("registrations_rewritten", timeout=LEASE_TTL + 3)
        again = (await client.range(b"/pake/registry/orders/o1")).kvs[0]
        assert again.lease not in (0, kv.lease)
    finally:
        await client.close()
    # The endpoint went with the lease and came back: the sidecar on B ends up with it.
    await frontend.wait_for(lambda c: endpoints_of(c.snapshots[-1], "orders") == ["10.0.0.1:15006"]
                            and any(endpoints_of(s, "orders") == [] for s in c.snapshots))
    await orders.close()
    await frontend.close()


async def test_concurrent_applies_through_two_replicas_cannot_both_win(
        replicas: tuple[ControlProcess, ControlProcess], tmp_path: Path) -> None:
    a, b = replicas
    assert (await apply(a, MESH))[0] == 200
    # The operator's view: both looked at version 1 and apply with --expect-version 1.
    files = []
    for i, name in enumerate(("one", "two")):
        mesh = {"services": {**MESH["services"], "orders": {"timeouts": {"route": f"{i + 1}s"}}}}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(mesh))
        files.append(path)
    results = await asyncio.gather(
        a.pakectl("apply", "-f", str(files[0]), "--expect-version", "1"),
        b.pakectl("apply", "-f", str(files[1]), "--expect-version", "1"))
    assert sorted(r.code for r in results) == [0, 1], results
    loser = next(r for r in results if r.code == 1)
    # Which conflict the loser meets depends on timing: the other apply had already landed
    # when it read the running version, or both read version 1 and the store's revision check
    # refused the second write. Either way it says conflict and that nothing was applied.
    assert "conflict" in loser.stderr and ("someone applied meanwhile" in loser.stderr or (
        "another apply won the race" in loser.stderr and "nothing was applied" in loser.stderr)), loser.stderr

    # Without --expect-version: each apply gets a version of its own or a conflict, never both
    # winning one version; the history has each winner once.
    async def burst(cp: ControlProcess, i: int) -> tuple[int, Any]:
        return await apply(cp, {"services": {**MESH["services"],
                                             "orders": {"timeouts": {"route": f"{i + 10}s"}}}})
    answers = await asyncio.gather(*(burst(a if i % 2 else b, i) for i in range(8)))
    won = [body["version"] for status, body in answers if status == 200]
    lost = [body for status, body in answers if status != 200]
    assert all(body["error"] == "conflict" for body in lost), lost
    assert len(won) == len(set(won)) and won
    _, history = await admin(b, "GET", "/v1/config/history")
    versions = [v["version"] for v in history["versions"]]
    assert versions == list(range(1, 3 + len(won)))


async def test_a_replica_with_another_store_key_refuses_to_start(etcd: EtcdServer, tmp_path: Path) -> None:
    first = replica(tmp_path, etcd, "a")
    await first.start()
    try:
        stranger = ControlProcess(tmp_path / "c", "--store", f"etcd://127.0.0.1:{etcd.port}",
                                  "--lease-ttl", f"{LEASE_TTL}s")  # its own new store.key
        with pytest.raises(Exception, match="store key"):
            await stranger.start()
        assert any("give every replica the same --store-key-file" in line for line in stranger.stderr)
        # The CA key is sealed in etcd: its PEM is nowhere in the store.
        client = EtcdClient(etcd.endpoints)
        try:
            kv = (await client.range(b"/pake/ca/authority")).kvs[0]
        finally:
            await client.close()
        record = json.loads(kv.value)
        assert b"PRIVATE KEY" not in kv.value and set(record["signer"]) == {"chain", "key"}
        assert not any("PRIVATE KEY" in json.dumps(line) for line in first.lines)
    finally:
        await first.stop()
