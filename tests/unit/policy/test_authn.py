"""The authn filters: JWT and API key, their 401s, the headers they vouch for, and the
forged headers they strip."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import pytest

from sidecar.config.api_keys import ApiKey
from sidecar.config.jwt_providers import TokenHeader
from sidecar.config.policy import ServiceAuthn
from sidecar.filters.authn_api_key import build_api_key_authn, hash_api_key
from sidecar.filters.authn_jwt import bearer_challenge, build_jwt_authn
from sidecar.filters.claims_headers import build_header_sanitizer, claim_header_value
from sidecar.jwt.jwks import JwksCache, parse_jwks

from .conftest import (
    NOW,
    FakeAudit,
    FakeClock,
    SigningKey,
    bearer,
    claims,
    exchange,
    jwks,
    mint,
    provider,
    request,
)

API_KEY = "pk_live_7c1f0e1d2b3a4c5d"


class NoSource:
    description = "none"

    async def fetch(self) -> bytes:  # pragma: no cover
        raise AssertionError


def jwt_filter(keys: dict[str, SigningKey], audit: FakeAudit | None = None,
               authn: ServiceAuthn | None = None, **overrides: Any) -> Any:
    p = provider(**overrides)
    cache = JwksCache(p, NoSource(), clock=FakeClock(),
                      keyset=parse_jwks(jwks(keys["RS256"], keys["ES256"]), p.algorithms))
    return build_jwt_authn(authn or ServiceAuthn(jwt=("pake",)), {"pake": p}, {"pake": cache},
                           audit=audit, wall=lambda: NOW)


def key_filter(audit: FakeAudit | None = None, *, jwt: bool = False,
               required: bool = True) -> Any:
    keys = {
        "ci": ApiKey("ci", bytes.fromhex(hash_api_key(API_KEY)[7:]), "ci-bot",
                     frozenset({"deployer"})),
        "other": ApiKey("other", hashlib.sha256(b"another key").digest(), "other", frozenset()),
    }
    authn = ServiceAuthn(jwt=("pake",) if jwt else (), api_keys=("ci", "other"),
                         required=required)
    return build_api_key_authn(authn, keys, audit=audit)


def header(reply: Any, name: bytes) -> list[bytes]:
    return [v for k, v in reply.headers if k == name]


# === JWT =================================================================================


def test_valid_token_sets_principal_claims_roles_and_audits(
        keys: dict[str, SigningKey], audit: FakeAudit) -> None:
    f = jwt_filter(keys, audit, claims_to_headers=(("email", "x-user-email"),))
    ex = exchange(request(headers=bearer(mint(keys["RS256"], claims(email="a@pake.local")))))
    assert f.on_request(ex) is None
    assert ex.principal == "alice" and ex.roles == frozenset({"reader"})
    assert ex.claims is not None and ex.claims["email"] == "a@pake.local"
    assert ex.request.header(b"x-user-email") == b"a@pake.local"
    assert ex.request.header(b"x-pake-principal") == b"alice"
    assert ex.request.header(b"x-pake-roles") == b"reader"
    assert ex.request.header(b"authorization") is not None  # forward: true by default
    assert audit.records == [("req-1", "authn", "allow", "jwt:pake", "token verified")]


def test_forward_false_removes_the_token(keys: dict[str, SigningKey]) -> None:
    f = jwt_filter(keys, forward=False, from_params=("access_token",))
    ex = exchange(request(headers=bearer(mint(keys["RS256"]))))
    assert f.on_request(ex) is None and ex.request.header(b"authorization") is None
    token = mint(keys["RS256"])
    ex = exchange(request(path="/orders", target=f"/orders?a=1&access_token={token}".encode()))
    assert f.on_request(ex) is None and ex.request.target == b"/orders?a=1"


def test_bad_token_is_401_with_invalid_token_challenge(keys: dict[str, SigningKey],
                                                       audit: FakeAudit) -> None:
    f = jwt_filter(keys, audit)
    token = mint(keys["RS256"], claims(exp=NOW - 3600))
    reply = f.on_request(exchange(request(headers=bearer(token))))
    assert (reply.status, reply.flag, reply.error) == (401, "UAEX", "unauthenticated")
    assert header(reply, b"www-authenticate") == [
        b'Bearer realm="pake", error="invalid_token", error_description="token expired"']
    assert token.encode() not in b"".join(v for _, v in reply.headers) + reply.detail.encode()
    assert audit.records == [("req-1", "authn", "deny", "authn_jwt", "token expired")]


def test_missing_token_when_required(keys: dict[str, SigningKey], audit: FakeAudit) -> None:
    reply = jwt_filter(keys, audit).on_request(exchange())
    assert reply.status == 401
    assert header(reply, b"www-authenticate") == [b'Bearer realm="pake"']
    assert audit.records[0][2] == "deny"


def test_missing_token_when_optional_passes_and_is_audited(keys: dict[str, SigningKey],
                                                           audit: FakeAudit) -> None:
    f = jwt_filter(keys, audit, authn=ServiceAuthn(jwt=("pake",), required=False))
    ex = exchange()
    assert f.on_request(ex) is None and ex.claims is None
    assert audit.records == [("req-1", "authn", "allow", "authn_jwt",
                              "no credential (authentication optional)")]


@pytest.mark.parametrize("how", ["two headers", "header and query", "two params"])
def test_two_tokens_are_refused(keys: dict[str, SigningKey], how: str) -> None:
    f = jwt_filter(keys, from_params=("access_token",))
    token = mint(keys["RS256"])
    if how == "two headers":
        req = request(headers=bearer(token) + bearer(token))
    elif how == "header and query":
        req = request(headers=bearer(token), target=f"/orders/1?access_token={token}".encode())
    else:
        req = request(target=f"/orders/1?access_token={token}&access_token={token}".encode())
    reply = f.on_request(exchange(req))
    assert reply.status == 401
    assert b'error="invalid_request"' in header(reply, b"www-authenticate")[0]


def test_custom_token_header(keys: dict[str, SigningKey]) -> None:
    f = jwt_filter(keys, from_headers=(TokenHeader("x-jwt", ""),))
    ex = exchange(request(headers=[(b"x-jwt", mint(keys["ES256"]).encode())]))
    assert f.on_request(ex) is None and ex.principal == "alice"


def test_challenge_description_is_quote_safe() -> None:
    value = bearer_challenge("pake", "invalid_token", 'bad "x" \\ \x01 \u00e9')
    assert value == (b'Bearer realm="pake", error="invalid_token", '
                     b'error_description="bad \'x\' \' \' \'"')


# === header spoofing =====================================================================


def test_forged_identity_and_claim_headers_are_stripped(keys: dict[str, SigningKey]) -> None:
    forged = [(b"x-user-email", b"root@evil"), (b"x-pake-principal", b"admin"),
              (b"x-pake-roles", b"admin"), (b"x-pake-peer-identity", b"spiffe://x/service/y")]
    p = provider(claims_to_headers=(("email", "x-user-email"),))
    sanitizer = build_header_sanitizer([p])
    ex = exchange(request(headers=list(forged) + [(b"accept", b"*/*")]))
    assert sanitizer.on_request(ex) is None
    assert ex.request.headers == [(b"accept", b"*/*")]

    # Without the sanitizer, the JWT filter still strips what it vouches for, even when it
    # then refuses the request or no token is sent.
    f = jwt_filter(keys, claims_to_headers=(("email", "x-user-email"),),
                   authn=ServiceAuthn(jwt=("pake",), required=False))
    ex = exchange(request(headers=list(forged)))
    assert f.on_request(ex) is None
    assert [k for k, _ in ex.request.headers] == [b"x-pake-peer-identity"]
    ex = exchange(request(headers=list(forged) + bearer(mint(keys["RS256"]))))
    assert f.on_request(ex) is None
    assert ex.request.header(b"x-user-email") is None  # token has no email claim
    assert ex.request.header_values(b"x-pake-principal") == [b"alice"]


@pytest.mark.parametrize(("value", "expected"), [
    ("alice", b"alice"), (3, b"3"), (True, b"true"), (["a", "b"], b"a,b"),
    ("evil\r\nx-admin: 1", None), ({"a": 1}, None), (["a,b"], None), ("x" * 5000, None),
])
def test_claim_header_values_are_injection_safe(value: Any, expected: bytes | None) -> None:
    assert claim_header_value(value) == expected


# === API keys ============================================================================


@pytest.mark.parametrize("hdr", [(b"x-api-key", API_KEY.encode()),
                                 (b"authorization", b"ApiKey " + API_KEY.encode()),
                                 (b"authorization", b"apikey  " + API_KEY.encode())])
def test_api_key_match(hdr: tuple[bytes, bytes], audit: FakeAudit) -> None:
    ex = exchange(request(headers=[hdr]))
    assert key_filter(audit).on_request(ex) is None
    assert ex.principal == "ci-bot" and ex.roles == frozenset({"deployer"})
    assert ex.tags["authn"] == "api_key" and ex.tags["api_key"] == "ci"
    assert ex.request.header(b"x-api-key") is None  # the credential stops here
    assert ex.request.header(b"authorization") is None
    assert ex.request.header(b"x-pake-principal") == b"ci-bot"
    assert audit.records == [("req-1", "authn", "allow", "api_key:ci", "key matched")]


@pytest.mark.parametrize("headers", [
    [(b"x-api-key", b"wrong")],
    [(b"x-api-key", b"")],
    [(b"x-api-key", b"k" * 600)],
    [(b"x-api-key", API_KEY.encode()), (b"x-api-key", API_KEY.encode())],
    [(b"x-api-key", API_KEY.encode()), (b"authorization", b"ApiKey " + API_KEY.encode())],
    [(b"authorization", b"ApiKey a"), (b"authorization", b"ApiKey b")],
    [],
])
def test_api_key_refused(headers: list[tuple[bytes, bytes]], audit: FakeAudit) -> None:
    reply = key_filter(audit).on_request(exchange(request(headers=headers)))
    assert reply.status == 401 and reply.flag == "UAEX"
    assert header(reply, b"www-authenticate") == [b'ApiKey realm="pake"']
    assert API_KEY not in reply.detail
    assert [r[2] for r in audit.records] == ["deny"]


def test_api_key_compared_in_constant_time_against_every_key(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    ex = exchange(request(headers=[(b"x-api-key", API_KEY.encode())]))
    assert key_filter().on_request(ex) is None
    digest = hashlib.sha256(API_KEY.encode()).digest()
    assert len(calls) == 2  # no early exit on the first (matching) key
    assert all(a == digest for a, _ in calls)


def test_api_key_with_jwt(keys: dict[str, SigningKey], audit: FakeAudit) -> None:
    authn = ServiceAuthn(jwt=("pake",), api_keys=("ci", "other"))
    jf, kf = jwt_filter(keys, audit, authn=authn), key_filter(audit, jwt=True)

    ex = exchange(request(headers=bearer(mint(keys["RS256"]))))  # token only
    assert jf.on_request(ex) is None and kf.on_request(ex) is None
    ex = exchange(request(headers=[(b"x-api-key", API_KEY.encode())]), request_id="r2")
    assert jf.on_request(ex) is None and kf.on_request(ex) is None
    assert ex.principal == "ci-bot"
    ex = exchange(request(headers=bearer(mint(keys["RS256"]))
                          + [(b"x-api-key", API_KEY.encode())]), request_id="r3")
    assert jf.on_request(ex).status == 401  # two credentials
    reply = jf.on_request(exchange(request_id="r4")) or kf.on_request(exchange(request_id="r4"))
    assert header(reply, b"www-authenticate") == [b'Bearer realm="pake"', b'ApiKey realm="pake"']
    # Exactly one authn record per exchange.
    assert [(r[0], r[2]) for r in audit.records] == [
        ("req-1", "allow"), ("r2", "allow"), ("r3", "deny"), ("r4", "deny")]


def test_optional_api_key(audit: FakeAudit) -> None:
    ex = exchange(request(headers=[(b"x-pake-principal", b"admin")]))
    assert key_filter(audit, required=False).on_request(ex) is None
    assert ex.request.header(b"x-pake-principal") is None
    assert audit.records[0][2] == "allow"
