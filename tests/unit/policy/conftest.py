"""Fixtures for the policy filters: keys of every supported type (made once per session),
a JWKS builder, a token minter, exchanges built directly, a fake clock and a fake audit."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from sidecar.audit import request_reason
from sidecar.config.jwt_providers import JwtProvider
from sidecar.exchange import Exchange
from sidecar.http.message import RequestHead
from tests.helpers.fake_clock import FakeClock

__all__ = ["FakeClock"]  # re-exported: the policy tests import it from here

ISSUER = "https://issuer.pake.local"
AUDIENCE = "pake"
NOW = 1_800_000_000.0  # a fixed wall clock for token times


@dataclass
class FakeAudit:
    records: list[tuple[str, str, str, str, str]] = field(default_factory=list)

    def record(self, exchange: Exchange, stage: str, decision: str, rule: str,
               reason: str) -> None:
        self.records.append((exchange.request_id, stage, decision, rule, reason))

    def record_request(self, exchange: Exchange, stage: str, decision: str, rule: str,
                       start: str) -> None:
        self.record(exchange, stage, decision, rule, request_reason(start, exchange))


@dataclass(frozen=True)
class SigningKey:
    kid: str
    alg: str
    private: Any
    public_jwk: dict[str, Any]


def _public_jwk(alg: str, private: Any, kid: str) -> dict[str, Any]:
    public = private.public_key()
    if alg.startswith(("RS", "PS")):
        data = json.loads(RSAAlgorithm.to_jwk(public))
    elif alg.startswith("ES"):
        data = json.loads(ECAlgorithm.to_jwk(public))
    else:
        data = json.loads(OKPAlgorithm.to_jwk(public))
    data.update(kid=kid, use="sig", alg=alg)
    return data


@pytest.fixture(scope="session")
def keys() -> dict[str, SigningKey]:
    """One key per supported algorithm family (RSA keygen is slow: made once)."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_key2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    made = {
        "RS256": ("rsa-1", rsa_key),
        "RS256-b": ("rsa-2", rsa_key2),
        "PS256": ("ps-1", rsa_key),
        "ES256": ("ec-256", ec.generate_private_key(ec.SECP256R1())),
        "ES384": ("ec-384", ec.generate_private_key(ec.SECP384R1())),
        "EdDSA": ("ed-1", ed25519.Ed25519PrivateKey.generate()),
    }
    out = {}
    for name, (kid, private) in made.items():
        alg = name.split("-")[0]
        out[name] = SigningKey(kid, alg, private, _public_jwk(alg, private, kid))
    return out


def jwks(*signing: SigningKey, extra: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"keys": [k.public_jwk for k in signing] + (extra or [])}


def claims(**overrides: Any) -> dict[str, Any]:
    base = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "exp": NOW + 300, "iat": NOW - 10,
            "roles": ["reader"]}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def mint(key: SigningKey, payload: dict[str, Any] | None = None, *,
         headers: dict[str, Any] | None = None, alg: str | None = None) -> str:
    hdr = {"kid": key.kid}
    hdr.update(headers or {})
    return jwt.encode(payload if payload is not None else claims(), key.private,
                      algorithm=alg or key.alg, headers=hdr)


def provider(**overrides: Any) -> JwtProvider:
    base: dict[str, Any] = dict(name="pake", issuer=ISSUER, audiences=(AUDIENCE,),
                                algorithms=frozenset({"RS256", "PS256", "ES256", "ES384",
                                                      "EdDSA"}),
                                jwks_uri="https://issuer.pake.local/jwks.json")
    base.update(overrides)
    return JwtProvider(**base)


def request(method: str = "GET", path: str = "/orders/1", *,
            headers: list[tuple[bytes, bytes]] | None = None, target: bytes | None = None,
            content_length: int | None = None, chunked: bool = False) -> RequestHead:
    return RequestHead(method=method, target=target or path.encode(), path=path,
                       authority="orders", host="orders", version="1.1",
                       headers=list(headers or []), content_length=content_length,
                       chunked=chunked)


def exchange(req: RequestHead | None = None, *, peer: str | None = None,
             client: str = "203.0.113.7", request_id: str = "req-1",
             route: Any = None, **kw: Any) -> Exchange:
    kw.setdefault("principal", peer)
    ex = Exchange(request=req or request(), listener="inbound", downstream_address=client,
                  request_id=request_id, start=0.0, peer_identity=peer,
                  trace_id="trace-1", service="orders", **kw)
    ex.route = route
    return ex


def bearer(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", b"Bearer " + token.encode())]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def audit() -> FakeAudit:
    return FakeAudit()


@pytest.fixture
def wall() -> Callable[[], float]:
    return lambda: NOW
