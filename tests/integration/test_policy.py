"""Who may call what, end to end (issue 4): real sidecar processes between a real client and
a real app.

A gateway sidecar (``mode: gateway``, plain listener) runs its own service's chain in front
of the echo app (or a ``RecordingUpstream`` where "nothing reached the app" is the point):
JWT and API-key authentication, RBAC, rate limits, validation, the audit log. An inbound
sidecar enforces a policy on mTLS source identities, with a real caller sidecar per
identity. Each test looks at what the client got, what the app saw, and what the sidecar
logged: ``access`` lines (flags, tags) and audit records (one JSON line per decision on
stdout, told apart by their ``stage`` and ``decision`` fields; the audit writer is a
thread, so they are read after the process has drained, which flushes them).
Every port is 0; nothing sleeps for readiness (tests wait on the ``ready`` and
``jwks_updated`` log lines).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from multidict import CIMultiDict

from tests.helpers.pki import make_test_pki
from examples.echo import make_app
from tests.helpers.sidecar_process import SidecarProcess
from tests.helpers.upstreams import RecordingUpstream

ISSUER = "https://issuer.pake.local"
AUDIENCE = "pake"
API_KEY = "test-key-0123456789abcdef"
API_KEY_HASH = "sha256:" + hashlib.sha256(API_KEY.encode()).hexdigest()
GATEWAY_BOOT = {"service": "gateway", "mode": "gateway",
                "listeners": {"gateway": "127.0.0.1:0", "admin": "127.0.0.1:0"}}


# === keys and tokens =====================================================================


@dataclass(frozen=True)
class Key:
    kid: str
    private: rsa.RSAPrivateKey

    @property
    def jwk(self) -> dict[str, Any]:
        data = json.loads(RSAAlgorithm.to_jwk(self.private.public_key()))
        return {**data, "kid": self.kid, "use": "sig", "alg": "RS256"}

    def token(self, sub: str = "alice", roles: tuple[str, ...] = ("reader",), **claims: Any) -> str:
        now = int(time.time())
        payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "roles": list(roles),
                   "iat": now - 5, "exp": now + 600, **claims}
        return jwt.encode({k: v for k, v in payload.items() if v is not None}, self.private,
                          algorithm="RS256", headers={"kid": self.kid})


@pytest.fixture(scope="module")
def keys() -> tuple[Key, Key]:
    """Two RSA signing keys (made once: RSA key generation is the slow part)."""
    return (Key("key-1", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
            Key("key-2", rsa.generate_private_key(public_exponent=65537, key_size=2048)))


def jwks(*signing: Key) -> dict[str, Any]:
    return {"keys": [k.jwk for k in signing]}


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def unsigned_token(kid: str) -> str:
    """``alg: none``, empty signature: what an attacker sends."""
    now = int(time.time())
    return (_b64({"alg": "none", "typ": "JWT", "kid": kid}) + "." + _b64(
        {"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory", "roles": ["admin"],
         "iat": now, "exp": now + 600}) + ".")


def hs256_with_public_key(key: Key) -> str:
    """Algorithm confusion: HMAC "signed" with the issuer's public key as the secret."""
    public_pem = key.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    now = int(time.time())
    signing_input = (_b64({"alg": "HS256", "typ": "JWT", "kid": key.kid}) + "." + _b64(
        {"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory", "roles": ["admin"],
         "iat": now, "exp": now + 600}))
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# === config ==============================================================================


def provider(**overrides: Any) -> dict[str, Any]:
    """A JWT provider section; an override of None drops the key."""
    base = {"issuer": ISSUER, "audiences": [AUDIENCE], "algorithms": ["RS256"],
            "jwks_file": "jwks.json",
            "claims_to_headers": {"sub": "x-user", "email": "x-user-email"}, **overrides}
    return {k: v for k, v in base.items() if v is not None}


ADMIN_POLICY = {
    "default": "deny",
    "rules": [
        {"name": "admin-only", "deny": {"paths": ["/api/admin/**"]},
         "unless": {"claims": {"roles": {"contains": "admin"}}}},
        {"name": "callers", "allow": {"paths": ["/api/**"]}},
    ],
}
ORDER_SCHEMA = {"type": "object", "required": ["item", "qty"],
                "properties": {"item": {"type": "string"},
                               "qty": {"type": "integer", "minimum": 1}}}


def gateway_mesh(upstream: str, *, policy: dict[str, Any] | None = None,
                 jwt_provider: dict[str, Any] | None = None,
                 routes: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The gateway's own service (authn, policy, routes by prefix) and the upstream ``echo``."""
    gateway: dict[str, Any] = {
        "authn": {"jwt": ["issuer"], "api_keys": ["ci"], "required": True},
        "routes": routes or [{"name": "api", "match": {"path_prefix": "/api/"},
                              "to": [{"service": "echo"}]}],
    }
    if policy is not None:
        gateway["policy"] = policy
    return {
        "jwt_providers": {"issuer": jwt_provider or provider()},
        "api_keys": {"ci": {"hash": API_KEY_HASH, "principal": "ci-bot", "roles": ["deployer"]}},
        "services": {"gateway": gateway, "echo": {"endpoints": [upstream]}},
    }


def gateway(tmp_path: Path, mesh: dict[str, Any], *, key_set: dict[str, Any] | None = None,
            name: str = "gateway") -> SidecarProcess:
    sc = SidecarProcess(tmp_path, bootstrap=GATEWAY_BOOT, mesh=mesh, name=name)
    if key_set is not None:
        (sc.dir / "jwks.json").write_text(json.dumps(key_set))
    return sc


# === what the sidecar logged =============================================================


def audit_records(sc: SidecarProcess) -> list[dict[str, Any]]:
    """The audit log's lines among stdout's (read after the process has exited)."""
    return [line for line in sc.lines
            if isinstance(line, dict) and "stage" in line and "decision" in line]


def audit_by_request(sc: SidecarProcess) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for record in audit_records(sc):
        out.setdefault(record["request_id"], []).append(record)
    return out


def access_by_request(sc: SidecarProcess) -> dict[str, dict[str, Any]]:
    return {a["request_id"]: a for a in sc.events("access")}


@dataclass
class Reply:
    status: int
    headers: Any  # CIMultiDictProxy: repeated headers (WWW-Authenticate) stay apart
    body: bytes

    @property
    def request_id(self) -> str:
        return str(self.headers["x-request-id"])

    def json(self) -> Any:
        return json.loads(self.body)


async def call(http: aiohttp.ClientSession, sc: SidecarProcess, path: str, *,
               method: str = "GET", headers: dict[str, str] | None = None,
               data: Any = None, json_body: Any = None) -> Reply:
    async with http.request(method, sc.url("gateway") + path, headers=headers, data=data,
                            json=json_body) as resp:
        return Reply(resp.status, resp.headers, await resp.read())


async def raw_request(port: int, request: bytes) -> Reply:
    """One request written whole from a plain socket; the response read by its length."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        try:
            await writer.drain()
        except ConnectionError:
            pass  # the peer may close early; what it answered is still to be read
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = CIMultiDict(line.split(": ", 1) for line in lines[1:] if line)
            body = await reader.readexactly(int(headers.get("content-length", "0")))
        return Reply(int(lines[0].split()[1]), headers, body)
    finally:
        writer.close()


# === authentication ======================================================================


async def test_jwt_and_api_keys_at_the_gateway(tmp_path: Path, keys: tuple[Key, Key]) -> None:
    key, other = keys
    async with TestServer(make_app(), host="127.0.0.1", port=0) as app:
        sc = gateway(tmp_path, gateway_mesh(f"127.0.0.1:{app.port}"), key_set=jwks(key))
        async with sc, aiohttp.ClientSession() as http:
            # A valid token: verified claims reach the app in the configured headers, and the
            # same headers sent by the client are gone (one value each, ours).
            spoofed = {"x-user": "spoofed-user", "x-user-email": "spoofed@evil",
                       "x-pake-principal": "spoofed-root", "x-pake-roles": "admin",
                       "x-pake-peer-identity": "spiffe://pake.local/service/spoofed"}
            ok = await call(http, sc, "/api/hello", headers={
                **bearer(key.token(email="alice@pake.local", roles=("reader", "writer"))), **spoofed})
            assert ok.status == 200, ok.body
            seen = {k.lower(): v for k, v in ok.json()["headers"].items()}
            assert seen["x-user"] == "alice"
            assert seen["x-user-email"] == "alice@pake.local"
            assert seen["x-pake-principal"] == "alice"
            assert seen["x-pake-roles"] == "reader,writer"
            assert "x-pake-peer-identity" not in seen  # no mTLS peer at the edge
            assert b"spoofed" not in ok.body

            # Refusals: 401 with a Bearer challenge; none reaches the app.
            missing = await call(http, sc, "/api/hello", headers={"x-user": "spoofed-user"})
            assert missing.status == 401
            challenges = missing.headers.getall("WWW-Authenticate")
            assert 'Bearer realm="pake"' in challenges and 'ApiKey realm="pake"' in challenges
            assert missing.json()["error"] == "unauthenticated"

            refused = {
                "expired": key.token(exp=int(time.time()) - 3600, iat=int(time.time()) - 7200),
                "wrong audience": key.token(aud="someone-else"),
                "wrong issuer": key.token(iss="https://evil.example"),
                "alg none": unsigned_token(key.kid),
                "hs256 with the public key": hs256_with_public_key(key),
                "unknown key": other.token(),
                "altered payload": _tamper(key.token()),
            }
            for what, token in refused.items():
                reply = await call(http, sc, "/api/hello", headers=bearer(token))
                assert reply.status == 401, what
                challenge = reply.headers["WWW-Authenticate"]
                assert challenge.startswith('Bearer realm="pake", error="invalid_token", '
                                            'error_description="'), (what, challenge)
                assert token not in challenge and token.encode() not in reply.body

            # API keys: either header; the key itself never reaches the app.
            by_header = await call(http, sc, "/api/k",
                                   headers={"x-api-key": API_KEY, "x-user": "spoofed-user"})
            by_scheme = await call(http, sc, "/api/k", headers={"Authorization": f"ApiKey {API_KEY}"})
            for reply in (by_header, by_scheme):
                assert reply.status == 200, reply.body
                seen = {k.lower(): v for k, v in reply.json()["headers"].items()}
                assert seen["x-pake-principal"] == "ci-bot" and seen["x-pake-roles"] == "deployer"
                assert "x-user" not in seen  # a claim header, stripped even without a token
                assert "x-api-key" not in seen and "authorization" not in seen
                assert API_KEY.encode() not in reply.body
            wrong = await call(http, sc, "/api/k", headers={"x-api-key": API_KEY + "x"})
            assert wrong.status == 401 and wrong.json()["detail"] == "invalid api key"
            both = await call(http, sc, "/api/k", headers={**bearer(key.token()), "x-api-key": API_KEY})
            assert both.status == 401  # two credentials in one request: ambiguous

    access = access_by_request(sc)
    assert access[ok.request_id]["flags"] == "-" and access[ok.request_id]["principal"] == "alice"
    refusals = [missing, wrong, both]
    assert all(access[r.request_id]["flags"] == "UAEX" for r in refusals)
    assert sum(1 for a in access.values() if a["flags"] == "UAEX") == 3 + len(refused)
    # Exactly one authn decision per request, and no audit line carries a credential.
    audit = audit_by_request(sc)
    assert len(audit) == len(access) == 3 + 3 + len(refused)
    assert all([r["stage"] for r in records] == ["authn"] for records in audit.values())
    decisions = Counter(records[0]["decision"] for records in audit.values())
    assert decisions == {"allow": 3, "deny": 3 + len(refused)}
    assert audit[ok.request_id][0]["principal"] == "alice"
    assert audit[ok.request_id][0]["rule"] == "jwt:issuer"
    assert audit[by_header.request_id][0]["rule"] == "api_key:ci"
    assert audit[missing.request_id][0]["reason"] == "missing credential"
    text = "\n".join(json.dumps(r) for r in audit_records(sc))
    assert API_KEY not in text and "eyJ" not in text


def _tamper(token: str) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["roles"] = ["admin"]
    return f"{header}.{_b64(claims)}.{signature}"


# === authorization =======================================================================


async def test_rbac_denies_with_a_reason_and_dry_run_only_records(tmp_path: Path,
                                                                  keys: tuple[Key, Key]) -> None:
    key = keys[0]
    async with RecordingUpstream() as upstream:
        enforcing = gateway(tmp_path, gateway_mesh(upstream.address, policy=ADMIN_POLICY),
                            key_set=jwks(key), name="enforcing")
        dry = gateway(tmp_path, gateway_mesh(upstream.address,
                                             policy={**ADMIN_POLICY, "dry_run": True}),
                      key_set=jwks(key), name="dry-run")
        admin, reader = bearer(key.token("root", ("admin",))), bearer(key.token("bob", ("reader",)))
        async with enforcing, dry, aiohttp.ClientSession() as http:
            allowed = await call(http, enforcing, "/api/admin/users", headers=admin)
            assert allowed.status == 200
            forwarded = upstream.requests
            denied = await call(http, enforcing, "/api/admin/users", headers=reader)
            assert denied.status == 403
            assert denied.json() == {
                "error": "forbidden", "service": "gateway",
                "detail": "rule 'admin-only' denies GET /api/admin/users "
                          "from client 127.0.0.1 as bob"}
            assert upstream.requests == forwarded  # the denied request reached nobody
            # what no rule allows is denied (the policy's default)
            outside = await call(http, enforcing, "/other", headers=admin)
            assert outside.status == 403 and outside.json()["detail"].startswith("no rule allows")
            # a path that is not in normal form is never matched against the rules
            sneaky = await call(http, enforcing, "/api/x/..%2Fadmin/users", headers=reader)
            assert sneaky.status == 403

            would = await call(http, dry, "/api/admin/users", headers=reader)
            assert would.status == 200  # dry run: decided, logged, not enforced

    access = access_by_request(enforcing)
    assert access[denied.request_id]["flags"] == "RBAC"
    assert access[denied.request_id]["rbac_rule"] == "admin-only"
    assert access[denied.request_id]["reason"] == denied.json()["detail"]
    assert access[allowed.request_id]["rbac"] == "allow"
    audit = audit_by_request(enforcing)
    assert [(r["stage"], r["decision"], r["rule"]) for r in audit[denied.request_id]] == [
        ("authn", "allow", "jwt:issuer"), ("authz", "deny", "admin-only")]
    assert [(r["stage"], r["decision"], r["rule"]) for r in audit[allowed.request_id]] == [
        ("authn", "allow", "jwt:issuer"), ("authz", "allow", "callers")]
    assert audit[outside.request_id][-1]["rule"] == "default"
    assert audit[denied.request_id][-1]["principal"] == "bob"

    dry_audit = audit_by_request(dry)[would.request_id]
    assert [(r["stage"], r["decision"], r["rule"]) for r in dry_audit] == [
        ("authn", "allow", "jwt:issuer"), ("authz", "would_deny", "admin-only")]
    assert access_by_request(dry)[would.request_id]["rbac"] == "would_deny"
    assert access_by_request(dry)[would.request_id]["flags"] == "-"
    assert [w["rule"] for w in dry.events("rbac_dry_run_deny")] == ["admin-only"]


# === rate limits and validation ==========================================================


async def test_rate_limit_answers_429_with_retry_after_per_subject(tmp_path: Path,
                                                                   keys: tuple[Key, Key]) -> None:
    key = keys[0]
    routes = [{"name": "limited", "match": {"path_prefix": "/api/"}, "to": [{"service": "echo"}],
               # 1/m: no token comes back during the test, so the count is exact
               "rate_limit": {"rate": "1/m", "burst": 3, "key": "subject"}}]
    async with RecordingUpstream() as upstream:
        sc = gateway(tmp_path, gateway_mesh(upstream.address, routes=routes), key_set=jwks(key))
        alice, bob = bearer(key.token("alice")), bearer(key.token("bob"))
        async with sc, aiohttp.ClientSession() as http:
            burst = [await call(http, sc, "/api/x", headers=alice) for _ in range(3)]
            assert [r.status for r in burst] == [200, 200, 200]
            limited = await call(http, sc, "/api/x", headers=alice)
            assert limited.status == 429
            assert limited.json()["error"] == "rate_limited"
            assert 1 <= int(limited.headers["Retry-After"]) <= 60
            assert limited.headers["RateLimit-Limit"] == "3"
            assert limited.headers["RateLimit-Remaining"] == "0"
            assert int(limited.headers["RateLimit-Reset"]) > 0
            assert limited.headers["RateLimit-Policy"] == "3;w=180"
            assert (await call(http, sc, "/api/x", headers=bob)).status == 200  # own bucket
            assert upstream.requests == 4
    assert access_by_request(sc)[limited.request_id]["flags"] == "RL"


async def test_validation_refuses_method_size_type_and_schema(tmp_path: Path,
                                                              keys: tuple[Key, Key]) -> None:
    key = keys[0]
    routes = [{"name": "orders", "match": {"path_prefix": "/api/orders"}, "to": [{"service": "echo"}],
               "validation": {"methods": ["GET", "POST"], "max_body": "1KiB",
                              "content_types": ["application/json"], "json_schema": ORDER_SCHEMA}}]
    async with TestServer(make_app(), host="127.0.0.1", port=0) as app:
        sc = gateway(tmp_path, gateway_mesh(f"127.0.0.1:{app.port}", routes=routes), key_set=jwks(key))
        auth = bearer(key.token())
        async with sc:
            async with aiohttp.ClientSession() as http:
                good = await call(http, sc, "/api/orders", method="POST", headers=auth,
                                  json_body={"item": "tea", "qty": 2})
                assert good.status == 200
                assert json.loads(good.json()["body"]) == {"item": "tea", "qty": 2}

                method = await call(http, sc, "/api/orders", method="DELETE", headers=auth)
                assert method.status == 405 and method.headers["Allow"] == "GET, POST"

                media = await call(http, sc, "/api/orders", method="POST", data=b"item=tea",
                                   headers={**auth, "Content-Type": "text/plain"})
                assert media.status == 415 and "application/json" in media.json()["detail"]

                schema = await call(http, sc, "/api/orders", method="POST", headers=auth,
                                    json_body={"item": "tea", "qty": 0})
                assert schema.status == 400
                assert schema.json()["detail"].startswith("$.qty: ")

                missing = await call(http, sc, "/api/orders", method="POST", headers=auth,
                                     json_body={"qty": 1})
                assert missing.status == 400
                assert "'item' is a required property" in missing.json()["detail"]

                not_json = await call(http, sc, "/api/orders", method="POST", data=b"{nope",
                                      headers={**auth, "Content-Type": "application/json"})
                assert not_json.status == 400 and not_json.json()["detail"] == "body is not valid JSON"

                # no body at all, where the schema wants one
                empty = await call(http, sc, "/api/orders", method="POST", data=b"",
                                   headers={**auth, "Content-Type": "application/json"})
                assert empty.status == 400 and empty.json()["detail"] == "a JSON body is required"

            # 413 closes the connection (the body is not read): one session per refusal
            async with aiohttp.ClientSession() as http:
                big = await call(http, sc, "/api/orders", method="POST", data=b"x" * 2048,
                                 headers={**auth, "Content-Type": "application/json"})
                assert big.status == 413

            # A chunked body has no length to check up front: it is collected up to the bound.
            # (Sent whole from a raw socket: an HTTP client that is still writing when the
            # 413 and the close come would see a broken pipe instead; see the next test.)
            body = b'{"item": "' + b"y" * 2000 + b'"}'
            chunked = await raw_request(sc.ports["gateway"], (
                b"POST /api/orders HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\nAuthorization: " + auth["Authorization"].encode()
                + b"\r\n\r\n%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"))
            assert chunked.status == 413
            assert chunked.json()["detail"] == "request body exceeds the 1024 bytes this route accepts"
            # a chunked body with no chunk: collected as the empty body it is, and checked
            no_chunk = await raw_request(sc.ports["gateway"], (
                b"POST /api/orders HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\nAuthorization: " + auth["Authorization"].encode()
                + b"\r\n\r\n0\r\n\r\n"))
            assert no_chunk.status == 400 and no_chunk.json()["detail"] == "body is not valid JSON"

    access = access_by_request(sc)
    for reply in (method, media, schema, missing, not_json, empty, big, chunked, no_chunk):
        assert access[reply.request_id]["flags"] == "IV", reply.request_id
    assert access[good.request_id]["flags"] == "-"


async def test_an_oversize_upload_gets_its_413_not_a_reset(tmp_path: Path,
                                                          keys: tuple[Key, Key]) -> None:
    key = keys[0]
    routes = [{"name": "small", "match": {"path_prefix": "/api/"}, "to": [{"service": "echo"}],
               "validation": {"max_body": "1KiB"}}]
    async with RecordingUpstream() as upstream:
        sc = gateway(tmp_path, gateway_mesh(upstream.address, routes=routes), key_set=jwks(key))
        async with sc:
            # What a user uploading a file does: write the whole request, then read the answer.
            # 32 MiB is more than the kernel's buffers hold, so the client is still writing
            # when the answer comes: it must not be cut off by a reset before it can read it.
            size = 32 * 1024 * 1024
            reader, writer = await asyncio.open_connection("127.0.0.1", sc.ports["gateway"])
            writer.write(b"POST /api/upload HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n" % size
                         + b"Authorization: Bearer " + key.token().encode() + b"\r\n\r\n"
                         + b"x" * size)
            try:
                await writer.drain()
            except ConnectionError:
                pass  # the sidecar stopped reading: fine, as long as its answer can be read
            try:
                async with asyncio.timeout(10):
                    status_line = await reader.readline()
            finally:
                writer.close()
            assert status_line.startswith(b"HTTP/1.1 413 ")
        assert upstream.requests == 0


# === keys fetched from an issuer, rotated ================================================


class JwksServer:
    """An issuer's key set over HTTP on 127.0.0.1:0; ``document`` can change at any time."""

    def __init__(self, document: dict[str, Any], *, delay: float = 0.0) -> None:
        self.document = document
        self.delay = delay  # a slow issuer
        self.fetches = 0
        app = web.Application()
        app.router.add_get("/jwks.json", self._serve)
        self.server = TestServer(app, host="127.0.0.1", port=0)

    async def _serve(self, request: web.Request) -> web.Response:
        self.fetches += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        return web.json_response(self.document)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/jwks.json"

    async def __aenter__(self) -> JwksServer:
        await self.server.start_server()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.close()


async def test_jwks_uri_rotation_keeps_old_tokens_until_their_key_leaves(
        tmp_path: Path, keys: tuple[Key, Key]) -> None:
    old, new = keys
    async with JwksServer(jwks(old)) as issuer, RecordingUpstream() as upstream:
        mesh = gateway_mesh(upstream.address, jwt_provider=provider(
            jwks_file=None, jwks_uri=issuer.url, refresh="1s", min_refetch_interval="100ms"))
        sc = gateway(tmp_path, mesh)
        old_token, new_token = bearer(old.token("old-key-user")), bearer(new.token("new-key-user"))
        async with sc, aiohttp.ClientSession() as http:
            # The first fetch runs in the background after start: wait for its log line.
            await sc.wait_for_event("jwks_updated", count=1)
            assert (await call(http, sc, "/api/a", headers=old_token)).status == 200

            issuer.document = jwks(old, new)  # the issuer publishes its next key
            await sc.wait_for_event("jwks_updated", count=2)
            assert (await call(http, sc, "/api/b", headers=new_token)).status == 200
            assert (await call(http, sc, "/api/c", headers=old_token)).status == 200

            issuer.document = jwks(new)  # ... and retires the old one
            await sc.wait_for_event("jwks_updated", count=3)
            gone = await call(http, sc, "/api/d", headers=old_token)
            assert gone.status == 401  # the cached verification ends with its key
            assert 'error_description="unknown signing key"' in gone.headers["WWW-Authenticate"]
            assert (await call(http, sc, "/api/e", headers=new_token)).status == 200
    updates = sc.events("jwks_updated")
    assert [u["kids"] for u in updates] == [["key-1"], ["key-1", "key-2"], ["key-2"]]
    assert upstream.requests == 4


async def test_valid_tokens_pass_as_soon_as_the_sidecar_is_ready(tmp_path: Path,
                                                                keys: tuple[Key, Key]) -> None:
    key = keys[0]
    async with JwksServer(jwks(key), delay=0.5) as issuer, RecordingUpstream() as upstream:
        mesh = gateway_mesh(upstream.address,
                            jwt_provider=provider(jwks_file=None, jwks_uri=issuer.url))
        async with gateway(tmp_path, mesh) as sc, aiohttp.ClientSession() as http:
            async with http.get(sc.admin + "/readyz") as resp:
                assert resp.status == 200
            first = await call(http, sc, "/api/a", headers=bearer(key.token()))
            assert first.status == 200, first.headers.get("WWW-Authenticate")


# === inbound: policy by mTLS source identity ============================================


async def test_inbound_policy_allows_frontend_and_denies_billing_by_mtls_identity(
        tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path / "pki", services=["orders", "frontend", "billing"])

    def tls(service: str) -> dict[str, str]:
        files = pki.services[service]
        return {"cert": str(files.cert), "key": str(files.key), "bundle": str(files.bundle)}

    policy = {"default": "deny", "rules": [
        {"name": "frontend-calls", "allow": {"from": ["frontend"], "methods": ["GET", "POST"]}}]}
    async with TestServer(make_app(), host="127.0.0.1", port=0) as app:
        orders = SidecarProcess(tmp_path, name="orders", bootstrap={
            "service": "orders", "app": f"127.0.0.1:{app.port}", "tls": tls("orders"),
            "listeners": {"inbound": {"address": "127.0.0.1:0", "tls": True}, "admin": "127.0.0.1:0"}},
            # its own endpoint is not used by its inbound (which forwards to the local app)
            mesh={"services": {"orders": {"endpoints": ["127.0.0.1:9"], "policy": policy}}})
        async with orders:
            callers_mesh = {"services": {"orders": {
                "endpoints": [f"127.0.0.1:{orders.ports['inbound']}"]}}}
            frontend = SidecarProcess(tmp_path, name="frontend", mesh=callers_mesh,
                                      bootstrap={"service": "frontend", "tls": tls("frontend")})
            billing = SidecarProcess(tmp_path, name="billing", mesh=callers_mesh,
                                     bootstrap={"service": "billing", "tls": tls("billing")})
            async with frontend, billing, aiohttp.ClientSession() as http:
                forged = {"Host": "orders",
                          "x-pake-peer-identity": "spiffe://pake.local/service/admin"}
                async with http.get(frontend.url() + "/orders/1", headers=forged) as resp:
                    assert resp.status == 200
                    seen = {k.lower(): v for k, v in (await resp.json())["headers"].items()}
                    allowed_id = resp.headers["x-request-id"]
                assert seen["x-pake-peer-identity"] == "spiffe://pake.local/service/frontend"
                async with http.get(billing.url() + "/orders/1", headers={"Host": "orders"}) as resp:
                    assert resp.status == 403
                    body = await resp.json()
                    denied_id = resp.headers["x-request-id"]
                assert body == {"error": "forbidden", "service": "orders",
                                "detail": "no rule allows GET /orders/1 "
                                          "from spiffe://pake.local/service/billing"}
                async with http.delete(frontend.url() + "/orders/1",
                                       headers={"Host": "orders"}) as resp:
                    assert resp.status == 403  # frontend, but not this method

    access = access_by_request(orders)
    assert access[denied_id]["flags"] == "RBAC"
    assert access[denied_id]["peer"] == "spiffe://pake.local/service/billing"
    audit = audit_by_request(orders)
    assert [(r["stage"], r["decision"], r["rule"], r["source"]) for r in audit[allowed_id]] == [
        ("authz", "allow", "frontend-calls", "spiffe://pake.local/service/frontend")]
    assert [(r["stage"], r["decision"], r["rule"], r["source"]) for r in audit[denied_id]] == [
        ("authz", "deny", "default", "spiffe://pake.local/service/billing")]
