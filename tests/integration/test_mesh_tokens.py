"""Mesh tokens end to end in static mode, with real sidecar processes and real mTLS.

outside client (a JWT) -> gateway sidecar (verifies it, mints the mesh token) == mTLS ==>
frontend sidecar (verifies the mesh token) -> frontend app, which forwards the token on its
own call -> frontend sidecar outbound (passes it unchanged) == mTLS ==> echo sidecar, whose
policy lets only the end user alice in: two hops from the gateway, the rule still sees who
the user is. Every port is 0; nothing sleeps for readiness.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from control.server import ControlPlane, ServeOptions
from examples.echo import make_app
from sidecar.config.load import parse_mesh
from sidecar.filters.mesh_token import build_mesh_token_mint, build_mesh_token_verify
from tests.helpers.mesh_client import MeshClient
from tests.helpers.pki import make_test_pki
from tests.helpers.sidecar_process import SidecarProcess

ISSUER = "https://issuer.pake.local"
HEADER = "x-pake-user"
MESH_ISSUER = "spiffe://pake.local/gateway"


def ec_key(kid: str) -> tuple[ec.EllipticCurvePrivateKey, dict[str, Any]]:
    private = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(ECAlgorithm.to_jwk(private.public_key()))
    return private, {**jwk, "kid": kid}


@dataclass
class Keys:
    outside: ec.EllipticCurvePrivateKey  # the outside issuer's key (callers' JWTs)
    outside_jwk: dict[str, Any]
    mesh: ec.EllipticCurvePrivateKey  # the mesh token signing key
    mesh_jwk: dict[str, Any]

    def user_jwt(self, sub: str, roles: list[str]) -> str:
        now = int(time.time())
        return jwt.encode({"iss": ISSUER, "aud": "pake", "sub": sub, "roles": roles,
                           "iat": now, "exp": now + 600}, self.outside, algorithm="ES256",
                          headers={"kid": "outside-1"})

    def mesh_token(self, sub: str, *, age: float = 0, key: Any = None) -> str:
        now = int(time.time() - age)
        return jwt.encode({"iss": MESH_ISSUER, "aud": "pake.local", "sub": sub,
                           "roles": ["admin"], "iat": now, "exp": now + 60},
                          key or self.mesh, algorithm="ES256", headers={"kid": "mesh-1"})

    def section(self, *, signing: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"ttl": "60s", "header": HEADER, "keys": [self.mesh_jwk]}
        if signing:
            pem = self.mesh.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()).decode()
            out["signing_key"] = {"kid": "mesh-1", "pem": pem}
        return out


@pytest.fixture(scope="module")
def keys() -> Keys:
    outside, outside_jwk = ec_key("outside-1")
    mesh, mesh_jwk = ec_key("mesh-1")
    return Keys(outside, outside_jwk, mesh, mesh_jwk)


ECHO_POLICY = {"default": "deny", "rules": [
    {"name": "alice-only", "deny": {"from": ["frontend"]}, "unless": {"principals": ["alice"]}},
    {"name": "frontend", "allow": {"from": ["frontend"]}},
]}


def frontend_app(outbound: list[str], http: aiohttp.ClientSession) -> web.Application:
    """The frontend calls echo through its sidecar and forwards the mesh token, as an app
    that wants its caller's identity to travel must."""
    async def handle(request: web.Request) -> web.Response:
        headers = {"Host": "echo"}
        if HEADER in request.headers:
            headers[HEADER] = request.headers[HEADER]
        async with http.get(outbound[0] + request.path, headers=headers) as resp:
            return web.Response(status=resp.status, body=await resp.read(),
                                content_type="application/json")
    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    return app


@dataclass
class Mesh:
    gateway: SidecarProcess
    frontend: SidecarProcess
    echo: SidecarProcess
    http: aiohttp.ClientSession

    async def call(self, path: str, headers: dict[str, str]) -> tuple[int, Any]:
        async with self.http.get(self.gateway.url("gateway") + path, headers=headers) as resp:
            return resp.status, await resp.json()


@asynccontextmanager
async def three_hops(tmp_path: Path, keys: Keys) -> AsyncIterator[Mesh]:
    pki = make_test_pki(tmp_path / "pki", services=["gateway", "frontend", "echo"])

    def tls(service: str) -> dict[str, str]:
        files = pki.services[service]
        return {"cert": str(files.cert), "key": str(files.key), "bundle": str(files.bundle)}

    inbound = {"address": "127.0.0.1:0", "tls": True}
    outbound: list[str] = []
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(aiohttp.ClientSession())
        echo_app = await stack.enter_async_context(TestServer(make_app(), host="127.0.0.1", port=0))
        echo = await stack.enter_async_context(SidecarProcess(tmp_path, name="echo", bootstrap={
            "service": "echo", "app": f"127.0.0.1:{echo_app.port}", "tls": tls("echo"),
            "listeners": {"inbound": inbound, "admin": "127.0.0.1:0"}},
            mesh={"mesh_tokens": keys.section(signing=False), "services": {
                "echo": {"endpoints": ["127.0.0.1:9"], "policy": ECHO_POLICY}}}))
        front_app = await stack.enter_async_context(
            TestServer(frontend_app(outbound, http), host="127.0.0.1", port=0))
        frontend = await stack.enter_async_context(SidecarProcess(
            tmp_path, name="frontend", bootstrap={
                "service": "frontend", "app": f"127.0.0.1:{front_app.port}", "tls": tls("frontend"),
                "listeners": {"inbound": inbound, "outbound": "127.0.0.1:0",
                              "admin": "127.0.0.1:0"}},
            mesh={"mesh_tokens": keys.section(signing=False), "services": {
                "frontend": {"endpoints": ["127.0.0.1:9"],
                             "policy": {"rules": [{"allow": {"from": ["gateway"]}}]}},
                "echo": {"endpoints": [f"127.0.0.1:{echo.ports['inbound']}"]}}}))
        outbound.append(frontend.url("outbound"))
        gateway = SidecarProcess(tmp_path, name="gateway", bootstrap={
            "service": "gateway", "mode": "gateway", "tls": tls("gateway"),
            "listeners": {"gateway": "127.0.0.1:0", "admin": "127.0.0.1:0"}},
            mesh={"mesh_tokens": keys.section(signing=True),
                  "jwt_providers": {"issuer": {"issuer": ISSUER, "audiences": ["pake"],
                                               "algorithms": ["ES256"],
                                               "jwks_file": "jwks.json"}},
                  "services": {
                      "gateway": {"authn": {"jwt": ["issuer"]},
                                  "routes": [{"to": [{"service": "frontend"}]}]},
                      "frontend": {"endpoints": [f"127.0.0.1:{frontend.ports['inbound']}"]}}})
        (gateway.dir / "jwks.json").write_text(json.dumps({"keys": [keys.outside_jwk]}))
        await stack.enter_async_context(gateway)
        yield Mesh(gateway, frontend, echo, http)


async def test_a_policy_two_hops_away_matches_the_end_user_and_outside_tokens_are_stripped(tmp_path: Path, keys: Keys) -> None:
    async with three_hops(tmp_path, keys) as mesh:
        status, body = await mesh.call("/orders/1", {
            "Authorization": f"Bearer {keys.user_jwt('alice', ['reader'])}"})
        assert status == 200, body
        seen = {k.lower(): v for k, v in body["headers"].items()}
        # echo's sidecar verified the token the frontend app forwarded: the app sees the user
        assert (seen["x-pake-principal"], seen["x-pake-roles"]) == ("alice", "reader")
        assert seen["x-pake-peer-identity"] == "spiffe://pake.local/service/frontend"
        claims = jwt.decode(seen[HEADER], keys.mesh.public_key(), algorithms=["ES256"],
                            audience="pake.local", issuer=MESH_ISSUER)
        assert (claims["sub"], claims["roles"], claims["exp"] - claims["iat"]) == (
            "alice", ["reader"], 60)

        status, body = await mesh.call("/orders/1", {
            "Authorization": f"Bearer {keys.user_jwt('bob', ['reader'])}"})
        assert status == 403
        assert body == {"error": "forbidden", "service": "echo",
                        "detail": "rule 'alice-only' denies GET /orders/1 from "
                                  "spiffe://pake.local/service/frontend as bob"}

        # Mesh tokens from outside are stripped at the gateway (one mesh start for both
        # halves: three sidecar processes are most of this test's time).
        other, _ = ec_key("mesh-1")
        bob = {"Authorization": f"Bearer {keys.user_jwt('bob', ['reader'])}"}
        for smuggled in (keys.mesh_token("alice", key=other),  # forged: not our key
                         keys.mesh_token("alice", age=3600),  # ours, but long expired
                         keys.mesh_token("alice")):  # ours and valid: still not from outside
            status, body = await mesh.call("/orders/1", {**bob, HEADER: smuggled})
            # neither honoured (alice would pass) nor refused as bad (401): removed, and the
            # gateway's own token for bob went on instead
            assert status == 403 and body["detail"].endswith(" as bob"), body
        status, body = await mesh.call("/orders/1", {HEADER: keys.mesh_token("alice")})
        assert status == 401  # a mesh token is no credential at the edge
    denied = [a for a in mesh.echo.events("access") if a.get("status") == 403]
    assert [a["flags"] for a in denied] == ["RBAC"] * 4


async def test_a_mesh_token_without_mtls_is_not_honoured(tmp_path: Path, keys: Keys) -> None:
    async with TestServer(make_app(), host="127.0.0.1", port=0) as app:
        plain = SidecarProcess(tmp_path, name="plain", bootstrap={
            "service": "echo", "app": f"127.0.0.1:{app.port}",
            "listeners": {"inbound": {"address": "127.0.0.1:0", "tls": False},
                          "admin": "127.0.0.1:0"}},
            mesh={"mesh_tokens": keys.section(signing=False), "services": {"echo": {
                "endpoints": ["127.0.0.1:9"],
                "policy": {"rules": [{"name": "alice", "allow": {"principals": ["alice"]}}]}}}})
        async with plain, aiohttp.ClientSession() as http:
            token = keys.mesh_token("alice")
            async with http.get(plain.url("inbound") + "/x", headers={HEADER: token}) as resp:
                assert resp.status == 403
                assert (await resp.json())["detail"].startswith("no rule allows GET /x from client")
        assert [a.get("tags", {}).get("mesh_token") for a in plain.events("access")] in (
            [None], ["ignored_no_mtls"])


# === the control plane: keys made, rotated, and sent only where they belong ==================


async def test_the_signing_key_reaches_only_gateway_snapshots(tmp_path: Path) -> None:
    plane = await ControlPlane.open(ServeOptions(state_dir=tmp_path / "state",
                                                 listen=("127.0.0.1", 0), admin=("127.0.0.1", 0)))
    await plane.start()
    clients: list[MeshClient] = []
    try:
        async def join(service: str) -> MeshClient:
            token, _ = await plane.tokens.create(service, timedelta(hours=1), 1, "test")
            client = MeshClient(tmp_path, f"127.0.0.1:{plane.ports['listen']}", service=service)
            await client.join(str(token))
            await client.connect()
            clients.append(client)
            return client

        gw, echo = await join("gateway"), await join("echo")
        # the operator's section names who mints; keys written there would be replaced
        await plane.config.apply({"mesh_tokens": {"gateways": ["gateway"], "ttl": "30s"},
                                  "services": {"gateway": {"routes": [{"to": [{"service": "echo"}]}]},
                                               "echo": {}}}, "test")
        plane.pusher.mark_dirty()
        gw_snap = await gw.wait_snapshot(lambda s: "mesh_tokens" in s.mesh)
        echo_snap = await echo.wait_snapshot(lambda s: "mesh_tokens" in s.mesh)
        gw_tokens, echo_tokens = gw_snap.mesh["mesh_tokens"], echo_snap.mesh["mesh_tokens"]
        assert "signing_key" not in echo_tokens and "PRIVATE KEY" not in json.dumps(echo_snap.mesh)
        assert gw_tokens["keys"] == echo_tokens["keys"] and len(echo_tokens["keys"]) == 1
        assert gw_tokens["signing_key"]["kid"] == echo_tokens["keys"][0]["kid"]
        # what the gateway mints with its snapshot, echo's snapshot verifies
        gw_config, echo_config = parse_mesh(gw_snap.mesh), parse_mesh(echo_snap.mesh)
        assert gw_config.mesh_tokens is not None and echo_config.mesh_tokens is not None
        minted = build_mesh_token_mint(gw_config.mesh_tokens).token_for("alice", frozenset({"reader"}))
        verified = build_mesh_token_verify(echo_config.mesh_tokens).authenticator.authenticate(minted)
        assert verified.principal == "alice"

        # rotation: the new key is published to everyone before the gateway signs with it
        old_kid = gw_tokens["signing_key"]["kid"]
        await plane.mesh_tokens.rotate()
        rotated = await echo.wait_snapshot(lambda s: len(s.mesh["mesh_tokens"]["keys"]) == 2)
        assert "signing_key" not in rotated.mesh["mesh_tokens"]
        gw_rotated = await gw.wait_snapshot(lambda s: len(s.mesh["mesh_tokens"]["keys"]) == 2)
        assert gw_rotated.mesh["mesh_tokens"]["signing_key"]["kid"] == old_kid
        # the ring survives a restart of the control plane (it lives in the store)
        assert (await plane.mesh_tokens.load()).keys[-1].kid == rotated.mesh["mesh_tokens"]["keys"][1]["kid"]
    finally:
        for client in clients:
            await client.close()
        await plane.stop()
