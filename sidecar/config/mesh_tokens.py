"""The ``mesh_tokens`` section: short-lived tokens that carry the end user through the mesh.

After a gateway authenticates an outside caller (a JWT or an API key) it attaches a mesh
token (ES256 JWT: ``iss``, ``sub`` = the end user, ``roles``, ``aud`` = the mesh, ``iat``,
``exp``) in one header; inbound sidecars verify it and let RBAC match on that user, however
many hops away. Written by hand in static mode; the control plane fills in ``keys`` (and,
for the services named in ``gateways`` only, ``signing_key``) and rotates them::

    mesh_tokens:
      issuer: spiffe://pake.local/gateway   # default spiffe://<trust domain>/gateway
      audience: pake.local                  # default: the trust domain
      ttl: 60s                              # a token's life (5s .. 1h)
      leeway: 5s                            # clock skew allowed when verifying
      header: x-pake-user                   # where the token travels
      gateways: [gateway]                   # services whose snapshots get signing_key
      keys: [{kty: EC, crv: P-256, kid: k1, x: ..., y: ...}]   # public JWKs (ES256)
      signing_key: {kid: k1, pem: "-----BEGIN PRIVATE KEY-----..."}   # gateways only

Pure: no PyJWT, no cryptography (the filter loads the keys when it is built, and a key that
does not load is a ``ConfigError`` then). The PEM is a secret: marked for ``redact`` and
never quoted in an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..http.headers import DEFAULT_MESH_TOKEN_HEADER, HOP_BY_HOP, MESH_INTERNAL, RESERVED_HEADERS
from .reader import ENTRY_NAME, Fields, header_name, strings_of

__all__ = ["MeshTokenKey", "MeshTokens", "SigningKey", "parse_mesh_tokens"]

MAX_KEYS = 16  # current, next and the ones still verifying: a handful
_B64URL = re.compile(r"^[A-Za-z0-9_-]+$")
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")
# Headers that carry framing, credentials or identities the sidecar sets itself: the token
# header must be none of them (the parser drops some, the authn filters own the others).
_FORBIDDEN_HEADERS = frozenset({
    *(h.decode() for h in HOP_BY_HOP | MESH_INTERNAL), *RESERVED_HEADERS,
    "authorization", "proxy-authorization", "cookie", "x-api-key", "x-request-id",
    "x-forwarded-for", "x-forwarded-proto",
})


@dataclass(frozen=True, slots=True)
class MeshTokenKey:
    """A public key (EC P-256) that verifies mesh tokens signed under ``kid``."""

    kid: str
    x: str
    y: str

    def jwk(self) -> dict[str, str]:
        return {"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": self.kid,
                "x": self.x, "y": self.y}


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    pem: str = field(repr=False, metadata={"secret": True})


@dataclass(frozen=True, slots=True)
class MeshTokens:
    issuer: str
    audience: str
    ttl: float = 60.0
    leeway: float = 5.0
    header: str = DEFAULT_MESH_TOKEN_HEADER
    gateways: tuple[str, ...] = ()  # read by the control plane: who gets signing_key
    keys: tuple[MeshTokenKey, ...] = ()
    signing_key: SigningKey | None = None

    @property
    def header_bytes(self) -> bytes:
        return self.header.encode("latin-1")


def _key(path: str, item: Any, node: Fields) -> MeshTokenKey | None:
    if not isinstance(item, dict):
        node.problems.add(path, f"must be a public JWK (a mapping), got {type(item).__name__}")
        return None
    if any(m in item for m in _PRIVATE_MEMBERS):
        # never echo the value: it is private key material
        node.problems.add(path, "holds private key material: keys are public keys only")
        return None
    key = Fields(item, path, node.problems)
    kty = key.str("kty", choices=("EC",))
    crv = key.str("crv", choices=("P-256",))
    key.str("alg", "ES256", choices=("ES256",))
    key.str("use", "sig", choices=("sig",))
    kid = key.str("kid", pattern=ENTRY_NAME)
    x, y = key.str("x", pattern=_B64URL), key.str("y", pattern=_B64URL)
    key.done()
    if not all(isinstance(v, str) for v in (kty, crv, kid, x, y)):
        return None
    return MeshTokenKey(kid=kid, x=x, y=y)


def _signing_key(node: Fields) -> SigningKey | None:
    kid = node.str("kid", pattern=ENTRY_NAME)
    pem = node.raw("pem")
    node.done()
    if not isinstance(pem, str) or "-----BEGIN" not in pem or "PRIVATE KEY-----" not in pem:
        if pem is not None:
            node.error("pem", "must be a PEM private key (the value is not shown)")
        return None
    return SigningKey(kid=kid, pem=pem) if isinstance(kid, str) else None


def parse_mesh_tokens(top: Fields, trust_domain: str) -> MeshTokens | None:
    """The top-level ``mesh_tokens`` section, or None when the mesh does not use them."""
    return top.optional("mesh_tokens", lambda node: _parse(node, trust_domain))


def _parse(node: Fields, trust_domain: str) -> MeshTokens:
    issuer = node.str("issuer", f"spiffe://{trust_domain}/gateway")
    audience = node.str("audience", trust_domain)
    ttl = node.duration("ttl", 60.0, min=5.0)
    if ttl > 3600:
        node.error("ttl", f"must be ≤ 1h (a mesh token is short-lived), got {node.data['ttl']!r}")
    leeway = node.duration("leeway", 5.0)
    if leeway > 60:
        node.error("leeway", f"must be ≤ 60s, got {node.data['leeway']!r}")
    header = DEFAULT_MESH_TOKEN_HEADER
    if node.has("header"):
        name = header_name(node, "header", node.raw("header"))
        if name is not None and name in _FORBIDDEN_HEADERS:
            node.error("header", f"{name!r} is reserved and cannot carry the mesh token")
        elif name is not None:
            header = name
    else:
        node.raw("header", None)
    gateways = strings_of(node, "gateways")
    keys: list[MeshTokenKey] = []
    kids: set[str] = set()
    listed = node.list("keys")
    if len(listed) > MAX_KEYS:
        node.error("keys", f"must hold at most {MAX_KEYS} keys, got {len(listed)}")
    for path, item in listed[:MAX_KEYS]:
        key = _key(path, item, node)
        if key is None:
            continue
        if key.kid in kids:
            node.problems.add(f"{path}.kid", f"{key.kid!r} is used by another key")
            continue
        kids.add(key.kid)
        keys.append(key)
    signing = node.optional("signing_key", _signing_key)
    if signing is not None and signing.kid not in kids:
        node.problems.add(f"{node.at('signing_key')}.kid",
                          f"{signing.kid!r} is not in keys: verifiers could not check its tokens")
    node.done()
    return MeshTokens(issuer=issuer, audience=audience, ttl=ttl, leeway=leeway, header=header,
                      gateways=gateways, keys=tuple(keys), signing_key=signing)
