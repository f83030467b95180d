"""Mesh tokens without sockets: the ``mesh_tokens`` section, minting at the gateway,
verification at an inbound sidecar, the RBAC ``roles`` matcher, and redaction."""

from __future__ import annotations

import json
from typing import Any

import jwt
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from sidecar.config.load import parse_mesh
from sidecar.config.mesh_tokens import MeshTokens
from sidecar.config.reader import ConfigError
from sidecar.config.redact import REDACTED, redact
from sidecar.filters.authz_rbac import build_rbac
from sidecar.filters.mesh_token import (
    MeshTokenStrip,
    build_mesh_token_mint,
    build_mesh_token_verify,
)
from tests.unit.policy.conftest import NOW, FakeAudit, exchange, request
from tests.unit.policy.test_rbac import policy

HEADER = b"x-pake-user"
PEER = "spiffe://pake.local/service/frontend"


def keypair(kid: str) -> tuple[dict[str, Any], str, ec.EllipticCurvePrivateKey]:
    private = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(ECAlgorithm.to_jwk(private.public_key()))
    jwk.update(kid=kid)
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return jwk, pem, private


@pytest.fixture(scope="module")
def k1() -> tuple[dict[str, Any], str, ec.EllipticCurvePrivateKey]:
    return keypair("k1")


def section(jwk: dict[str, Any], pem: str | None = None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"ttl": "60s", "keys": [jwk], **extra}
    if pem is not None:
        out["signing_key"] = {"kid": jwk["kid"], "pem": pem}
    return out


def config(data: dict[str, Any]) -> MeshTokens:
    mesh = parse_mesh({"trust_domain": "pake.local", "mesh_tokens": data})
    assert mesh.mesh_tokens is not None
    return mesh.mesh_tokens


def problems(data: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_mesh({"mesh_tokens": data})
    return caught.value.problems


# === the section ===========================================================================


def test_defaults_come_from_the_trust_domain(k1: Any) -> None:
    tokens = config(section(k1[0]))
    assert (tokens.issuer, tokens.audience, tokens.ttl, tokens.leeway, tokens.header) == (
        "spiffe://pake.local/gateway", "pake.local", 60.0, 5.0, "x-pake-user")
    assert tokens.signing_key is None and [k.kid for k in tokens.keys] == ["k1"]
    assert parse_mesh({}).mesh_tokens is None  # not configured: no filter, nothing imported


def test_bad_sections_name_the_path_and_never_show_a_private_key(k1: Any) -> None:
    jwk, pem, _ = k1
    found = problems({
        "ttl": "2h", "header": "Authorization", "gateways": [""], "colour": 1,
        "keys": [{**jwk, "d": "c2VjcmV0LXByaXZhdGU"}, {**jwk, "crv": "P-384", "kid": "k2"}],
        "signing_key": {"kid": "k9", "pem": "not a pem at all"},
    })
    text = "\n".join(found)
    assert "mesh_tokens.ttl: must be ≤ 1h" in text
    assert "mesh_tokens.header: 'authorization' is reserved" in text
    assert "mesh_tokens.gateways[0]" in text
    assert "mesh_tokens.colour: unknown key" in text
    assert "mesh_tokens.keys[0]: holds private key material" in text
    assert "mesh_tokens.keys[1].crv: must be one of P-256" in text
    assert "mesh_tokens.signing_key.pem: must be a PEM private key" in text
    assert "c2VjcmV0LXByaXZhdGU" not in text and "not a pem at all" not in text
    other = problems(section(jwk, pem) | {"signing_key": {"kid": "k2", "pem": pem}})
    assert other == ["mesh_tokens.signing_key.kid: 'k2' is not in keys: verifiers could not "
                     "check its tokens"]


def test_a_signing_key_that_does_not_match_its_public_key_is_refused(k1: Any) -> None:
    _, other_pem, _ = keypair("k1")
    tokens = config(section(k1[0], other_pem))
    with pytest.raises(ConfigError, match="does not match the public key 'k1'") as caught:
        build_mesh_token_mint(tokens)
    assert "PRIVATE" not in str(caught.value)


def test_the_signing_key_is_redacted_in_config_dumps(k1: Any) -> None:
    mesh = parse_mesh({"mesh_tokens": section(k1[0], k1[1])})
    dumped = json.dumps(redact(mesh))
    assert "PRIVATE KEY" not in dumped
    assert redact(mesh)["mesh_tokens"]["signing_key"] == {"kid": "k1", "pem": REDACTED}
    # the raw pushed form too (a snapshot dict logged or dumped as it came)
    assert "PRIVATE KEY" not in json.dumps(redact({"mesh_tokens": section(k1[0], k1[1])}))
    assert redact(mesh)["mesh_tokens"]["keys"][0]["x"] == k1[0]["x"]  # public stays visible


# === mint and verify =======================================================================


class Wall:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_minted_tokens_carry_the_user_and_are_reused_for_a_quarter_of_the_ttl(k1: Any) -> None:
    wall = Wall()
    mint = build_mesh_token_mint(config(section(k1[0], k1[1])), wall=wall)
    ex = exchange(request(headers=[(HEADER, b"forged")]), peer=None, principal="alice",
                  roles=frozenset({"reader", "admin"}))
    assert mint.on_request(ex) is None
    (token,) = ex.request.header_values(HEADER)
    header = jwt.get_unverified_header(token)
    assert (header["alg"], header["kid"]) == ("ES256", "k1")
    claims = jwt.decode(token, k1[2].public_key(), algorithms=["ES256"], audience="pake.local",
                        options={"verify_exp": False, "verify_iat": False})
    assert claims == {"iss": "spiffe://pake.local/gateway", "sub": "alice", "aud": "pake.local",
                      "iat": int(NOW), "exp": int(NOW) + 60, "roles": ["admin", "reader"]}
    assert mint.token_for("alice", frozenset({"admin", "reader"})) == token.decode()
    wall.now += 14.9
    assert mint.token_for("alice", frozenset({"admin", "reader"})) == token.decode()
    assert (mint.minted, mint.reused) == (1, 2)
    wall.now += 0.2  # past ttl/4: a fresh token, so one leaves with >= 3/4 of its life
    assert mint.token_for("alice", frozenset({"admin", "reader"})) != token.decode()
    anonymous = exchange(request(headers=[(HEADER, b"forged")]), peer=None, principal=None)
    mint.on_request(anonymous)
    assert anonymous.request.header_values(HEADER) == []  # no user: no token, forged one gone


def test_the_mint_cache_is_bounded(k1: Any) -> None:
    mint = build_mesh_token_mint(config(section(k1[0], k1[1])), wall=Wall())
    mint.cache_size = 3
    for user in ("a", "b", "c", "d", "e"):
        mint.token_for(user, frozenset())
    assert len(mint._cache) == 3


def verify_one(k1: Any, token: bytes | list[bytes], *, wall: Wall | None = None,
               peer: str | None = PEER, audit: FakeAudit | None = None, **extra: Any) -> Any:
    verify = build_mesh_token_verify(config(section(k1[0], **extra)), wall=wall or Wall(),
                                     audit=audit)
    tokens = token if isinstance(token, list) else [token]
    ex = exchange(request(headers=[(HEADER, t) for t in tokens]), peer=peer, principal=None)
    return verify.on_request(ex), ex


def test_a_verified_token_names_the_end_user_for_rbac_and_the_app(k1: Any) -> None:
    token = build_mesh_token_mint(config(section(k1[0], k1[1])), wall=Wall()).token_for(
        "alice", frozenset({"admin"}))
    audit = FakeAudit()
    reply, ex = verify_one(k1, token.encode(), wall=Wall(NOW + 30), audit=audit)
    assert reply is None
    assert (ex.principal, ex.roles, ex.tags["authn"]) == ("alice", frozenset({"admin"}), "mesh_token")
    assert ex.claims["iss"] == "spiffe://pake.local/gateway"
    assert ex.request.header_values(HEADER) == [token.encode()]  # passed on for forwarding
    assert ex.request.header(b"x-pake-principal") == b"alice"
    assert ex.request.header(b"x-pake-roles") == b"admin"
    assert audit.records[-1][1:4] == ("authn", "allow", "mesh_token_verify")


def sign(private: ec.EllipticCurvePrivateKey, kid: str = "k1", **overrides: Any) -> bytes:
    claims = {"iss": "spiffe://pake.local/gateway", "sub": "mallory", "aud": "pake.local",
              "iat": int(NOW), "exp": int(NOW) + 60, "roles": ["admin"]}
    claims.update(overrides)
    return jwt.encode({k: v for k, v in claims.items() if v is not None}, private,
                      algorithm="ES256", headers={"kid": kid}).encode()


@pytest.mark.parametrize(("make", "wall", "reason"), [
    (lambda k: sign(keypair("k1")[2]), NOW, "invalid signature"),  # forged: right kid, other key
    (lambda k: sign(k), NOW + 60 + 5.5, "token expired"),  # past exp + leeway
    (lambda k: sign(k, iss="https://issuer.pake.local"), NOW, "wrong issuer"),
    (lambda k: sign(k, aud="other.domain"), NOW, "wrong audience"),
    (lambda k: sign(k, kid="k7"), NOW, "unknown signing key"),
    (lambda k: jwt.encode({"sub": "x"}, "s" * 32, algorithm="HS256").encode(), NOW, "wrong issuer"),
    (lambda k: b"not-a-jwt", NOW, "malformed token"),
])
def test_an_invalid_token_from_a_peer_is_refused_401(k1: Any, make: Any, wall: float,
                                                     reason: str) -> None:
    audit = FakeAudit()
    reply, ex = verify_one(k1, make(k1[2]), wall=Wall(wall), audit=audit)
    assert (reply.status, reply.flag) == (401, "UAEX")
    assert reply.detail == f"mesh token refused: {reason}"
    assert ex.principal is None
    assert audit.records[-1][1:3] == ("authn", "deny")


def test_leeway_lets_a_token_just_past_exp_through(k1: Any) -> None:
    reply, ex = verify_one(k1, sign(k1[2]), wall=Wall(NOW + 60 + 4.5))
    assert reply is None and ex.principal == "mallory"


def test_two_tokens_are_refused_and_without_mtls_a_token_is_removed_not_honoured(k1: Any) -> None:
    good = sign(k1[2])
    reply, _ = verify_one(k1, [good, good])
    assert reply is not None and reply.detail == "mesh token refused: more than one mesh token"
    reply, ex = verify_one(k1, good, peer=None)
    assert reply is None and ex.principal is None and ex.tags["mesh_token"] == "ignored_no_mtls"
    assert ex.request.header_values(HEADER) == []  # the app never sees it to forward it


def test_with_no_keys_every_token_is_refused(k1: Any) -> None:
    verify = build_mesh_token_verify(config({"ttl": "60s"}), wall=Wall())
    ex = exchange(request(headers=[(HEADER, sign(k1[2]))]), peer=PEER, principal=None)
    reply = verify.on_request(ex)
    assert reply is not None and reply.status == 401


def test_the_service_s_own_authn_keeps_the_principal_it_verified(k1: Any) -> None:
    verify = build_mesh_token_verify(config(section(k1[0])), wall=Wall())
    ex = exchange(request(headers=[(HEADER, sign(k1[2]))]), peer=PEER, principal="carol")
    assert verify.on_request(ex) is None and ex.principal == "carol"


def test_the_gateway_strip_removes_every_copy() -> None:
    ex = exchange(request(headers=[(HEADER, b"a"), (b"x-other", b"1"), (HEADER, b"b")]))
    MeshTokenStrip(HEADER).on_request(ex)
    assert ex.request.headers == [(b"x-other", b"1")]


# === RBAC on the end user ==================================================================


def test_rbac_roles_and_principals_match_the_end_user_of_a_mesh_token(k1: Any) -> None:
    rbac = build_rbac(policy("""
rules:
  - name: admins
    allow: {from: [frontend], roles: [admin, ops]}
  - name: alice
    allow: {from: [frontend], principals: [alice]}
"""), service="orders", trust_domain="pake.local")
    mint = build_mesh_token_mint(config(section(k1[0], k1[1])), wall=Wall())
    verify = build_mesh_token_verify(config(section(k1[0])), wall=Wall())

    def status(user: str, roles: set[str]) -> tuple[int | None, str]:
        token = mint.token_for(user, frozenset(roles)).encode()
        ex = exchange(request(headers=[(HEADER, token)]), peer=PEER, principal=None)
        assert verify.on_request(ex) is None
        reply = rbac.on_request(ex)
        return (None if reply is None else reply.status), ex.tags["rbac_rule"]

    assert status("bob", {"ops"}) == (None, "admins")
    assert status("alice", {"reader"}) == (None, "alice")
    assert status("bob", {"reader"}) == (403, "default")


def test_roles_in_a_rule_must_be_strings() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_mesh(yaml.safe_load("""
services:
  orders:
    policy: {rules: [{allow: {roles: [1]}}]}
"""))
    assert caught.value.problems == [
        "services.orders.policy.rules[0].allow.roles[0]: must be a non-empty string, got 1"]


# === the control plane's key ring ==========================================================


def test_rotation_publishes_before_signing_and_drops_the_old_key_after_its_tokens() -> None:
    from control.mesh_tokens import KeyRing, new_key

    first = new_key(signs_from=NOW)
    ring = KeyRing((first,))
    section = {"gateways": ["gateway"], "ttl": "60s", "keys": [{"forged": 1}]}
    assert ring.section(section, "echo", NOW) == {"gateways": ["gateway"], "ttl": "60s",
                                                  "keys": [dict(first.jwk)]}
    assert ring.section(section, "gateway", NOW)["signing_key"] == {"kid": first.kid,
                                                                     "pem": first.pem}
    ring = ring.rotated(NOW + 100, publish_delay=10, token_life=65)
    second = ring.keys[-1]
    # published at once, signing 10 s later; the first key verifies until its last token ends
    assert [k["kid"] for k in ring.section(section, "echo", NOW + 100)["keys"]] == [first.kid,
                                                                                   second.kid]
    assert ring.signer(NOW + 109.9).kid == first.kid  # type: ignore[union-attr]
    assert ring.signer(NOW + 110) == second
    assert ring.next_change(NOW + 100) == NOW + 110
    assert ring.next_change(NOW + 110) == NOW + 175
    assert [k.kid for k in ring.published(NOW + 174.9)] == [first.kid, second.kid]
    assert [k.kid for k in ring.published(NOW + 175)] == [second.kid]
    assert KeyRing.from_json(ring.to_json()) == ring
    # what the control plane sends is what a sidecar accepts, and the pair matches
    mesh = parse_mesh({"mesh_tokens": ring.section(section, "gateway", NOW + 110)})
    assert mesh.mesh_tokens is not None and mesh.mesh_tokens.signing_key is not None
    build_mesh_token_mint(mesh.mesh_tokens)
