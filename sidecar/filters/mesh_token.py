"""Mesh tokens: the gateway signs who the end user is; inbound sidecars believe only that.

Three filters, built from the mesh's ``mesh_tokens`` section (``sidecar/config/mesh_tokens.py``):

- ``MeshTokenStrip`` (gateway listener, first): removes the token header from outside
  callers, so a forged or replayed token never enters the mesh through the edge.
- ``MeshTokenMint`` (gateway listener, last, gateway mode with a ``signing_key``): once
  authn and RBAC passed, sets the header to an ES256 token for the exchange's principal and
  roles. Tokens are cached per (principal, roles) and re-minted after a quarter of the ttl,
  so a token leaves the gateway with at least 3/4 of its life and a signature costs once
  per user per ttl/4, not per request (no ``jti``: the token is shared by design).
- ``MeshTokenVerify`` (inbound listener, after authn): a token from an mTLS mesh peer is
  verified (signature under the snapshot's keys, issuer, audience, expiry with leeway;
  the checks of ``sidecar.jwt.verifier``) and, unless the service's own authn already named
  the caller, becomes the exchange's principal, claims and roles, which RBAC matches
  (``principals``, ``roles``, ``claims``). An invalid token is refused **401 UAEX**, not
  stripped: a policy may deny a user (``deny: {principals: [bob]}``), and stripping bob's
  expired token would let his request through as nobody. A token without an mTLS peer
  (a plain-text inbound) never came from the mesh: it is removed, not honoured.

The header itself passes on unchanged, so the app can forward it on its own calls (the
outbound sidecar has no filters) and the next hop verifies it again.
"""

from __future__ import annotations

import base64
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..audit import AuditRecorder
from ..clock import Clock, MonotonicClock
from ..config.jwt_providers import JwtProvider
from ..config.mesh_tokens import MeshTokens
from ..config.reader import ConfigError
from ..errors import LocalReply, Unauthenticated
from ..exchange import Exchange
from ..jwt.authenticator import Authenticator
from ..jwt.jwks import JwksCache, JwksError, KeySet, parse_jwks
from ..jwt.verifier import JwtError, Verifier
from .claims_headers import PRINCIPAL_HEADER, ROLES_HEADER, set_identity_headers

__all__ = [
    "MeshTokenMint",
    "MeshTokenStrip",
    "MeshTokenVerify",
    "build_mesh_token_mint",
    "build_mesh_token_verify",
]

_ALGORITHMS: Final = frozenset({"ES256"})
MAX_TOKEN_SIZE: Final = 8 * 1024
MINT_CACHE_SIZE: Final = 4096  # distinct (user, roles) pairs kept; the oldest is dropped past it
REFRESH_FRACTION: Final = 0.25  # a cached token is re-minted after this share of the ttl


class MeshTokenStrip:
    """Removes the mesh token header: from outside, nobody may claim an end user."""

    name = "mesh_token_strip"

    def __init__(self, header: bytes) -> None:
        self.header = header

    def on_request(self, exchange: Exchange) -> LocalReply | None:
        exchange.request.remove_headers(self.header)
        return None


class MeshTokenMint:
    """Attaches the signed end user (the exchange's principal and roles) for the mesh."""

    name = "mesh_token_mint"

    def __init__(self, config: MeshTokens, key: ec.EllipticCurvePrivateKey, kid: str, *,
                 wall: Callable[[], float] = time.time, cache_size: int = MINT_CACHE_SIZE) -> None:
        self.config = config
        self.header = config.header_bytes
        self._key = key
        self._kid = kid
        self.wall = wall
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, tuple[str, ...]], tuple[str, float]] = OrderedDict()
        # Counters, read by metrics and tests.
        self.minted = 0
        self.reused = 0

    def token_for(self, principal: str, roles: frozenset[str]) -> str:
        """A token for ``principal``: the cached one while it is fresh, else a new one."""
        key = (principal, tuple(sorted(roles)))
        now = self.wall()
        cached = self._cache.get(key)
        if cached is not None and now < cached[1]:
            self._cache.move_to_end(key)
            self.reused += 1
            return cached[0]
        issued = int(now)
        claims: dict[str, Any] = {"iss": self.config.issuer, "sub": principal,
                                  "aud": self.config.audience, "iat": issued,
                                  "exp": issued + int(self.config.ttl), "roles": list(key[1])}
        token = jwt.encode(claims, self._key, algorithm="ES256",
                           headers={"kid": self._kid, "typ": "JWT"})
        self._cache[key] = (token, issued + self.config.ttl * REFRESH_FRACTION)
        self._cache.move_to_end(key)
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        self.minted += 1
        return token

    def on_request(self, exchange: Exchange) -> LocalReply | None:
        request = exchange.request
        request.remove_headers(self.header)  # the strip filter did; a later filter must not
        if exchange.principal is not None:
            token = self.token_for(exchange.principal, exchange.roles)
            request.headers.append((self.header, token.encode("ascii")))
            exchange.tag("mesh_token", "minted")
        return None


class MeshTokenVerify:
    """Believes a mesh token only from an mTLS peer, and only once it is verified."""

    name = "mesh_token_verify"

    def __init__(self, config: MeshTokens, authenticator: Authenticator, *,
                 audit: AuditRecorder | None = None) -> None:
        self.config = config
        self.header = config.header_bytes
        self.authenticator = authenticator
        self.audit = audit
        # Counters, read by metrics and tests.
        self.verified = 0
        self.denied = 0
        self.ignored = 0  # tokens removed because they did not come over mTLS

    def _deny(self, exchange: Exchange, description: str, reason: str) -> LocalReply:
        self.denied += 1
        exchange.tag("mesh_token", reason)
        if self.audit is not None:
            self.audit.record(exchange, "authn", "deny", self.name, description)
        return Unauthenticated(f"mesh token refused: {description}").reply()

    def on_request(self, exchange: Exchange) -> LocalReply | None:
        request = exchange.request
        values = request.header_values(self.header)
        if not values:
            return None
        if exchange.peer_identity is None:
            # Not from a mesh peer: whoever sent it is outside the mesh. Not honoured, and
            # not passed to the app either (it might forward it into the mesh).
            request.remove_headers(self.header)
            self.ignored += 1
            exchange.tag("mesh_token", "ignored_no_mtls")
            return None
        if len(values) != 1:
            return self._deny(exchange, "more than one mesh token", "ambiguous")
        try:
            verified = self.authenticator.authenticate(values[0].decode("ascii"))
        except UnicodeDecodeError:
            return self._deny(exchange, "malformed token", "malformed")
        except JwtError as exc:
            return self._deny(exchange, exc.description, exc.reason)
        self.verified += 1
        exchange.tag("mesh_token", "verified")
        if exchange.principal is not None:
            return None  # the service's own authn named the caller at this hop: it decides
        exchange.principal = verified.principal
        exchange.claims = dict(verified.claims)  # cached verifications share theirs: copy
        exchange.roles = verified.roles
        exchange.tag("authn", "mesh_token")
        request.remove_headers(PRINCIPAL_HEADER, ROLES_HEADER)
        set_identity_headers(request, verified.principal, verified.roles)
        if self.audit is not None:
            self.audit.record(exchange, "authn", "allow", self.name, "mesh token verified")
        return None


class _SnapshotKeys:
    """The key source of the verifier: the keys came with the snapshot, nothing to fetch."""

    def __init__(self, document: bytes) -> None:
        self.document = document
        self.description = "mesh_tokens.keys"

    async def fetch(self) -> bytes:
        return self.document


def build_mesh_token_verify(config: MeshTokens, *, clock: Clock | None = None,
                            audit: AuditRecorder | None = None, cache_size: int = 1024,
                            wall: Callable[[], float] = time.time) -> MeshTokenVerify:
    """The inbound verifier for this snapshot's ``mesh_tokens``. With no keys, every token
    from a peer is refused (fail closed): the control plane has not sent any yet."""
    document = {"keys": [k.jwk() for k in config.keys]}
    try:
        keyset = parse_jwks(document, _ALGORITHMS) if config.keys else KeySet()
    except JwksError as exc:  # a point off the curve, bad base64: the reason names no key
        raise ConfigError([f"mesh_tokens.keys: {exc}"]) from None
    provider = JwtProvider(name="mesh_tokens", issuer=config.issuer, audiences=(config.audience,),
                           algorithms=_ALGORITHMS, leeway=config.leeway, principal_claim="sub",
                           roles_claim="roles", max_token_size=MAX_TOKEN_SIZE,
                           min_refetch_interval=3600.0)
    # never started: the keys change only with a new snapshot, which builds a new verifier
    cache = JwksCache(provider, _SnapshotKeys(json.dumps(document).encode()),
                      clock=clock or MonotonicClock(), keyset=keyset)
    verifier = Verifier(provider, cache, wall=wall)
    authenticator = Authenticator({provider.name: verifier}, cache_size=cache_size, wall=wall)
    return MeshTokenVerify(config, authenticator, audit=audit)


def build_mesh_token_mint(config: MeshTokens, *,
                          wall: Callable[[], float] = time.time) -> MeshTokenMint:
    """The gateway's minter; ``config.signing_key`` must be set. The key is loaded here
    (build time, off the hot path); a key that does not load is a ``ConfigError`` that
    does not quote it."""
    signing = config.signing_key
    if signing is None:
        raise ConfigError(["mesh_tokens.signing_key: is required to mint tokens"])
    try:
        key = serialization.load_pem_private_key(signing.pem.encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError([f"mesh_tokens.signing_key.pem: not a usable private key "
                           f"({type(exc).__name__})"]) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ConfigError(["mesh_tokens.signing_key.pem: must be an EC P-256 key (ES256)"])
    public = next(k for k in config.keys if k.kid == signing.kid)  # checked by the parser
    numbers = key.public_key().public_numbers()
    if (_b64int(numbers.x), _b64int(numbers.y)) != (public.x, public.y):
        raise ConfigError([f"mesh_tokens.signing_key: does not match the public key "
                           f"{signing.kid!r} in keys"])
    return MeshTokenMint(config, key, signing.kid, wall=wall)


def _b64int(value: int) -> str:
    return base64.urlsafe_b64encode(value.to_bytes(32, "big")).rstrip(b"=").decode()
