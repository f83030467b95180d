"""The control plane in-process on port 0, with sidecar-like clients over real TLS and mTLS:
joins and their refusals, identity on the stream, pushes and subsets, endpoint expiry,
concurrent applies, renewal, the stream bound, the admin token."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from certs.ca import CLOCK_SKEW
from control.server import ControlPlane, ServeOptions
from sidecar.discovery.protocol import Certificate
from tests.helpers.mesh_client import JoinError, MeshClient, endpoints_of

MakePlane = Callable[..., Awaitable[ControlPlane]]

MESH: dict[str, Any] = {
    "services": {
        "orders": {"policy": {"default": "deny", "rules": [{"allow": {"from": ["frontend"]}}]}},
        "frontend": {"routes": [{"to": [{"service": "orders"}]}]},
    }
}


@pytest.fixture
async def make_plane(tmp_path: Path) -> AsyncIterator[MakePlane]:
    planes: list[ControlPlane] = []

    async def make(**options: Any) -> ControlPlane:
        opts = ServeOptions(state_dir=tmp_path / "state", listen=("127.0.0.1", 0),
                            admin=(options.pop("admin_host", "127.0.0.1"), 0), **options)
        plane = await ControlPlane.open(opts)
        await plane.start()
        planes.append(plane)
        return plane

    yield make
    for plane in planes:
        await plane.stop()


def listen(plane: ControlPlane) -> str:
    return f"127.0.0.1:{plane.ports['listen']}"


async def admin(plane: ControlPlane, method: str, path: str, body: Any = None,
                token: str | None = None) -> tuple[int, Any]:
    host = plane.options.admin[0]
    host = "127.0.0.1" if host == "0.0.0.0" else host
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http:
        async with http.request(method, f"http://{host}:{plane.ports['admin']}{path}",
                                json=body, headers=headers) as r:
            return r.status, await r.json(content_type=None)


async def token(plane: ControlPlane, service: str, **extra: Any) -> str:
    status, body = await admin(plane, "POST", "/v1/tokens", {"service": service, **extra})
    assert status == 200, body
    return str(body["token"])


async def joined(plane: ControlPlane, tmp_path: Path, service: str, **kwargs: Any) -> MeshClient:
    client = MeshClient(tmp_path, listen(plane), service=service, **kwargs)
    await client.join(await token(plane, service))
    await client.connect()
    return client


# === joining ===


async def test_refused_tokens_each_say_why(make_plane: MakePlane, tmp_path: Path) -> None:
    plane = await make_plane()
    client = MeshClient(tmp_path, listen(plane), service="orders")

    used = await token(plane, "orders")
    await client.join(used)
    with pytest.raises(JoinError) as info:
        await client.join(used)
    assert (info.value.status, info.value.code) == (403, "token_used_up")

    revoked = await token(plane, "orders")
    token_id = revoked.split(".")[1]
    assert (await admin(plane, "POST", f"/v1/tokens/{token_id}/revoke"))[0] == 200
    with pytest.raises(JoinError, match="token_revoked"):
        await client.join(revoked)

    expired, _ = await plane.tokens.create("orders", timedelta(hours=1), 1, "test",
                                           now=datetime.now(UTC) - timedelta(hours=2))
    with pytest.raises(JoinError, match="token_expired: join token .* expired at"):
        await client.join(str(expired))

    other = await token(plane, "frontend")
    with pytest.raises(JoinError, match="is for service 'frontend', not 'orders'"):
        await client.join(other)

    fingerprint = used.rsplit(".", 1)[1]
    with pytest.raises(JoinError, match="unknown_token"):
        await client.join(f"pake1.{'0' * 16}.{'A' * 43}.{fingerprint}")

    # A CSR for another name is refused, and does not use the token up.
    good = await token(plane, "orders")
    with pytest.raises(JoinError, match="csr_refused: CSR asks for spiffe://pake.local/service/frontend"):
        await client.join(good, csr_service="frontend")
    await client.join(good)
    assert client.certificate().subject.rfc4514_string() == "CN=orders"


async def test_token_list_never_shows_secrets(make_plane: MakePlane) -> None:
    plane = await make_plane()
    text = await token(plane, "orders", uses=3, ttl=60)
    status, body = await admin(plane, "GET", "/v1/tokens")
    assert status == 200
    [listed] = body["tokens"]
    assert listed["state"] == "valid" and listed["uses"] == 3
    secret = text.split(".")[2]
    assert secret not in str(body) and "secret_sha256" not in listed


async def test_no_token_for_the_control_planes_own_name(make_plane: MakePlane) -> None:
    plane = await make_plane()
    status, body = await admin(plane, "POST", "/v1/tokens", {"service": "pake-control"})
    assert status == 400 and "control plane's own name" in body["detail"]


# === the stream ===


async def test_a_certificate_for_a_cannot_register_as_b(make_plane: MakePlane, tmp_path: Path) -> None:
    plane = await make_plane()
    client = MeshClient(tmp_path, listen(plane), service="orders")
    await client.join(await token(plane, "orders"))
    await client.connect(hello_service="frontend")
    await client.wait_for(lambda c: c.closed)
    [error] = client.errors
    assert error.code == "identity_mismatch"
    assert "spiffe://pake.local/service/orders" in error.detail and "'frontend'" in error.detail
    assert plane.registry.registrations() == []


async def test_the_stream_requires_a_client_certificate(make_plane: MakePlane, tmp_path: Path) -> None:
    plane = await make_plane()
    client = MeshClient(tmp_path, listen(plane), service="orders")
    await client.join(await token(plane, "orders"))
    client.key_path.unlink()
    client.cert_path.unlink()
    ctx = ssl.create_default_context(cafile=str(client.bundle_path))
    ctx.check_hostname = False
    with pytest.raises(InvalidStatus) as info:
        await connect(f"wss://{listen(plane)}/v1/stream", ssl=ctx)
    assert info.value.response.status_code == 401
    assert b"mtls_required" in info.value.response.body


async def test_streams_past_the_bound_are_refused_clearly(make_plane: MakePlane, tmp_path: Path) -> None:
    plane = await make_plane(max_streams=1)
    first = await joined(plane, tmp_path, "orders")
    second = MeshClient(tmp_path, listen(plane), service="frontend")
    await second.join(await token(plane, "frontend"))
    with pytest.raises(InvalidStatus) as info:
        await second.connect()
    assert info.value.response.status_code == 503
    assert b"too_many_streams" in info.value.response.body
    await first.close()


async def test_apply_pushes_subsets_with_registry_endpoints(make_plane: MakePlane, tmp_path: Path) -> None:
    plane = await make_plane()
    orders = await joined(plane, tmp_path, "orders", address="127.0.0.1:16001")
    frontend = await joined(plane, tmp_path, "frontend", address=None)
    status, applied = await admin(plane, "POST", "/v1/config", {"mesh": MESH, "by": "test"})
    assert status == 200 and applied["version"] == 1

    # (orders is published once it holds a config: frontend may get a snapshot before that)
    snap = await frontend.wait_snapshot(lambda s: endpoints_of(s, "orders") == ["127.0.0.1:16001"])
    seen = len(frontend.snapshots)
    assert "policy" not in snap.mesh["services"]["orders"]  # the callee enforces it, not us
    own = await orders.wait_snapshot()
    assert own.mesh["services"]["orders"]["policy"]["default"] == "deny"
    await frontend.wait_for(lambda c: c.held_version == snap.version)

    # A change to orders' policy reaches orders only: frontend's subset did not change.
    changed = {"services": {**MESH["services"], "orders": {"policy": {"default": "allow"}}}}
    status, _ = await admin(plane, "POST", "/v1/config", {"mesh": changed, "by": "test"})
    assert status == 200
    await orders.wait_snapshot(lambda s: s.version.startswith("2."))
    await plane.streams.wait_until(lambda: plane.streams.sessions[("orders", "node-1")]
                                   .acked_version.startswith("2."), 5)  # type: ignore[union-attr]
    assert [s.version for s in frontend.snapshots[seen - 1:]] == [snap.version]
    await orders.close()
    await frontend.close()


async def test_an_endpoint_is_published_only_once_its_sidecar_holds_a_config(
        make_plane: MakePlane, tmp_path: Path) -> None:
    """A sidecar that has not accepted a config cannot serve: callers must not be sent there
    (a new sidecar registered at hello was routed to ~50 ms before it could answer)."""
    plane = await make_plane()
    await admin(plane, "POST", "/v1/config", {"mesh": MESH, "by": "test"})
    frontend = await joined(plane, tmp_path, "frontend", address=None)
    refusing = await joined(plane, tmp_path, "orders", node="refuses", address="127.0.0.1:16002",
                            refuse=lambda s: "services.orders: refused by this test")
    def nacked() -> bool:
        session = plane.streams.sessions.get(("orders", "refuses"))
        return session is not None and session.last_nack is not None

    await plane.streams.wait_until(nacked, 5)
    assert "orders" not in plane.registry.endpoints()
    serving = await joined(plane, tmp_path, "orders", node="serves", address="127.0.0.1:16003")
    snap = await frontend.wait_snapshot(lambda s: endpoints_of(s, "orders") == ["127.0.0.1:16003"])
    assert "127.0.0.1:16002" not in endpoints_of(snap, "orders")
    for client in (refusing, serving, frontend):
        await client.close()


async def test_a_nack_is_recorded_and_shown_as_stale(make_plane: MakePlane, tmp_path: Path) -> None:
    plane = await make_plane()
    client = await joined(plane, tmp_path, "orders",
                          refuse=lambda s: "services.orders: refused by this test" if s.version.startswith("2.") else None)
    await admin(plane, "POST", "/v1/config", {"mesh": MESH, "by": "test"})
    first = await client.wait_snapshot()
    await client.wait_for(lambda c: c.held_version == first.version)
    await admin(plane, "POST", "/v1/config",
                {"mesh": {"services": {"orders": {}}}, "by": "test"})
    await client.wait_snapshot(lambda s: s.version.startswith("2."))
    await plane.streams.wait_until(lambda: plane.streams.sessions[("orders", "node-1")].last_nack is not None, 5)
    status, body = await admin(plane, "GET", "/v1/status")
    [row] = body["sidecars"]
    # the last good config keeps serving: a 1.x (the registry may have re-pushed version 1
    # with the sidecar's own endpoint since ``first``), never the refused 2.x
    assert row["state"] == "stale" and row["held_version"] == client.held_version
    assert client.held_version is not None and client.held_version.startswith("1.")
    assert row["last_nack"]["error"] == "services.orders: refused by this test"
    await client.close()


async def test_invalid_apply_lists_every_error_with_its_path(make_plane: MakePlane) -> None:
    plane = await make_plane()
    bad = {"services": {"orders": {"routes": [{"to": [{"service": "nope"}]}], "retries": {"attempts": -1}}},
           "trust_domain": "other.local"}
    status, body = await admin(plane, "POST", "/v1/config", {"mesh": bad, "by": "test"})
    assert status == 422
    assert any(e.startswith("services.orders.routes[0].to[0].service: unknown service 'nope'")
               for e in body["errors"])
    assert any(e.startswith("services.orders.retries.attempts") for e in body["errors"])
    good_but_foreign = {"trust_domain": "other.local", "services": {"orders": {}}}
    status, body = await admin(plane, "POST", "/v1/config", {"mesh": good_but_foreign})
    assert status == 422 and body["errors"][0].startswith("trust_domain: must be 'pake.local'")
    assert (await admin(plane, "GET", "/v1/config"))[0] == 404  # nothing applied


async def test_endpoints_expire_when_heartbeats_stop(make_plane: MakePlane, tmp_path: Path) -> None:
    plane = await make_plane(heartbeat_interval=0.1, endpoint_grace=0.4)
    await admin(plane, "POST", "/v1/config", {"mesh": MESH, "by": "test"})
    orders = await joined(plane, tmp_path, "orders", address="127.0.0.1:16001")
    frontend = await joined(plane, tmp_path, "frontend", address=None)
    await frontend.wait_snapshot(lambda s: endpoints_of(s, "orders") == ["127.0.0.1:16001"])
    # orders stays connected but says nothing: its endpoint goes after the grace.
    await frontend.wait_snapshot(lambda s: endpoints_of(s, "orders") == [], timeout=3)
    assert plane.registry.get("orders", "node-1") is None
    # A heartbeat brings it back; an unhealthy app takes it out again.
    await orders.heartbeat(app_healthy=True)
    await frontend.wait_for(lambda c: endpoints_of(c.snapshots[-1], "orders") == ["127.0.0.1:16001"])
    await orders.heartbeat(app_healthy=False)
    await frontend.wait_for(lambda c: endpoints_of(c.snapshots[-1], "orders") == [])
    await orders.close()
    await frontend.close()


async def test_concurrent_applies_never_lose_one(make_plane: MakePlane) -> None:
    plane = await make_plane()
    meshes = [{"services": {f"s{i}": {}}} for i in range(4)]
    results = await asyncio.gather(*(admin(plane, "POST", "/v1/config", {"mesh": m, "by": f"u{i}"})
                                      for i, m in enumerate(meshes)))
    assert sorted(body["version"] for _, body in results) == [1, 2, 3, 4]
    _, history = await admin(plane, "GET", "/v1/config/history")
    assert sorted(v["by"] for v in history["versions"]) == ["u0", "u1", "u2", "u3"]
    # Both demanding the version they saw: exactly one wins, the other is told to look again.
    results = await asyncio.gather(*(admin(plane, "POST", "/v1/config",
                                           {"mesh": m, "by": "x", "expect_version": 4})
                                     for m in meshes[:2]))
    assert sorted(status for status, _ in results) == [200, 409]
    assert "someone applied meanwhile" in [b for s, b in results if s == 409][0]["detail"]


async def test_rollback_reapplies_an_earlier_version(make_plane: MakePlane) -> None:
    plane = await make_plane()
    for mesh in ({"services": {"a": {}}}, {"services": {"b": {}}}):
        await admin(plane, "POST", "/v1/config", {"mesh": mesh, "by": "t"})
    status, body = await admin(plane, "POST", "/v1/config/rollback", {"by": "t"})
    assert status == 200 and (body["version"], body["rollback_of"]) == (3, 1)
    assert (await admin(plane, "GET", "/v1/config"))[1]["mesh"] == {"services": {"a": {}}}
    status, body = await admin(plane, "POST", "/v1/config/rollback", {"version": 9})
    assert status == 404 and "no version 9" in body["detail"]


async def test_certificates_renew_at_two_thirds_with_a_new_key(make_plane: MakePlane, tmp_path: Path) -> None:
    plane = await make_plane(workload_ttl=timedelta(seconds=3))
    client = await joined(plane, tmp_path, "orders")
    first = client.certificate()
    first_key = client.key_path.read_bytes()
    await client.wait_for(lambda c: bool(c.of_type(Certificate)), timeout=4)
    renewed = datetime.now(UTC)
    # Counted from the certificate's own issue (the CA back-dates not_before by CLOCK_SKEW), not
    # from when this test got going: joining can take over a second on a loaded machine.
    # Certificate times are whole seconds, hence the margins.
    issued = first.not_valid_before_utc + CLOCK_SKEW
    assert renewed - issued > timedelta(seconds=1.5), "renewed at 2/3 of 3 s, not at once"
    assert renewed < first.not_valid_after_utc + timedelta(seconds=1), "renewed before it expired"
    await plane.streams.wait_until(lambda: plane.streams.sessions[("orders", "node-1")].cert_not_after
                                   > first.not_valid_after_utc, 5)
    assert client.certificate().serial_number != first.serial_number
    assert client.key_path.read_bytes() != first_key
    await client.close()


async def test_certs_rotate_reports_the_sidecars_that_did_not_renew(make_plane: MakePlane, tmp_path: Path) -> None:
    plane = await make_plane()
    good = await joined(plane, tmp_path, "orders")
    mute = await joined(plane, tmp_path, "frontend", answer_renew=False)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{plane.ports['admin']}/v1/certs/rotate",
                             json={"timeout": 1}) as r:
            lines = [line async for line in r.content]
    events = [json.loads(line) for line in lines]
    assert events[0] == {"event": "start", "total": 2}
    assert [e["service"] for e in events if e["event"] == "renewed"] == ["orders"]
    done = events[-1]
    assert done["renewed"] == 1 and [f["service"] for f in done["failed"]] == ["frontend"]
    assert "no renewed certificate acked" in done["failed"][0]["reason"]
    await good.close()
    await mute.close()


async def test_admin_off_loopback_requires_the_token(make_plane: MakePlane) -> None:
    plane = await make_plane(admin_host="0.0.0.0")
    status, body = await admin(plane, "GET", "/v1/status")
    assert status == 401 and body["error"] == "unauthorized"
    secret = (plane.options.state_dir / "admin.token").read_text().strip()
    assert (plane.options.state_dir / "admin.token").stat().st_mode & 0o777 == 0o600
    assert (await admin(plane, "GET", "/v1/status", token=secret))[0] == 200


async def test_an_unknown_message_type_is_answered_not_fatal(make_plane: MakePlane, tmp_path: Path) -> None:
    plane = await make_plane()
    client = await joined(plane, tmp_path, "orders")
    assert client.ws is not None
    await client.ws.send('{"type": "bogus"}')
    await client.wait_for(lambda c: bool(c.errors))
    assert client.errors[0].code == "bad_message" and "unknown message type 'bogus'" in client.errors[0].detail
    assert not client.closed
    await client.close()

