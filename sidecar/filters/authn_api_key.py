"""The ``authn_api_key`` filter: an API key from ``x-api-key`` or ``Authorization: ApiKey``.

Config holds only SHA-256 hashes. Per exchange: take at most one presented key (two, or a
key beside a verified token, is ambiguous: 401), hash it, and compare the digest with
*every* configured hash using ``hmac.compare_digest`` without stopping at a match, so the
time taken says nothing about which key, or how much of one, matched. A match sets the
principal and roles bound to the key; the key itself is removed before the request goes
upstream (the app never sees a credential). Runs after ``authn_jwt`` when both are
configured, and then makes the "no credential" decision for both.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Final

from ..audit import AuditRecorder
from ..config.api_keys import ApiKey
from ..config.policy import ServiceAuthn
from ..errors import LocalReply, Unauthenticated
from ..exchange import Exchange
from .claims_headers import PRINCIPAL_HEADER, ROLES_HEADER, set_identity_headers

__all__ = ["ApiKeyAuthnFilter", "build_api_key_authn", "hash_api_key"]

MAX_KEY: Final = 512  # bytes; a longer "key" is refused before hashing
_SCHEME: Final = b"apikey "


def hash_api_key(key: str | bytes) -> str:
    """What to put in config for a key: ``sha256:<hex>``."""
    data = key.encode("utf-8") if isinstance(key, str) else key
    return "sha256:" + hashlib.sha256(data).hexdigest()


class ApiKeyAuthnFilter:
    name = "authn_api_key"

    def __init__(self, keys: tuple[ApiKey, ...], *, required: bool, accepts_jwt: bool,
                 audit: AuditRecorder | None = None, realm: str = "pake") -> None:
        self.keys = keys
        self.required = required
        self.audit = audit
        challenges = [(b"www-authenticate", f'ApiKey realm="{realm}"'.encode("ascii"))]
        if accepts_jwt:
            challenges.insert(0, (b"www-authenticate", f'Bearer realm="{realm}"'.encode("ascii")))
        self._challenges = tuple(challenges)
        self.allowed = 0
        self.denied = 0

    def _deny(self, exchange: Exchange, description: str, reason: str) -> LocalReply:
        self.denied += 1
        exchange.tag_once("authn", "api_key")
        exchange.tag("authn_result", reason)
        if self.audit is not None:
            self.audit.record(exchange, "authn", "deny", self.name, description)
        return Unauthenticated(description, headers=self._challenges).reply()

    def on_request(self, exchange: Exchange) -> LocalReply | None:
        request = exchange.request
        authorization = request.header_values(b"authorization")
        if len(authorization) > 1:
            return self._deny(exchange, "more than one Authorization header", "ambiguous")
        presented = list(request.header_values(b"x-api-key"))
        presented += [v[len(_SCHEME):].strip() for v in authorization
                      if v[:len(_SCHEME)].lower() == _SCHEME]
        by_jwt = exchange.tags.get("authn") == "jwt"
        if not by_jwt:  # forged identity headers must not survive any outcome
            request.remove_headers(PRINCIPAL_HEADER, ROLES_HEADER)
        if not presented:
            if by_jwt:
                return None
            if self.required:
                return self._deny(exchange, "missing credential", "missing")
            if self.audit is not None:
                self.audit.record(exchange, "authn", "allow", self.name,
                                  "no credential (authentication optional)")
            return None
        if len(presented) > 1 or by_jwt:
            return self._deny(exchange, "more than one credential", "ambiguous")
        key = presented[0].strip()
        if not key or len(key) > MAX_KEY:
            return self._deny(exchange, "invalid api key", "invalid")
        digest = hashlib.sha256(key).digest()
        match: ApiKey | None = None
        for candidate in self.keys:  # no early exit: constant time over the key list
            if hmac.compare_digest(digest, candidate.hash):
                match = candidate
        if match is None:
            return self._deny(exchange, "invalid api key", "invalid")
        # The credential stops here; the app gets who, not the key.
        request.remove_headers(b"x-api-key")
        if authorization:
            request.remove_headers(b"authorization")
        exchange.principal = match.principal
        exchange.roles = match.roles
        exchange.tag("authn", "api_key")
        exchange.tag("api_key", match.name)
        set_identity_headers(request, match.principal, match.roles)
        self.allowed += 1
        if self.audit is not None:
            self.audit.record(exchange, "authn", "allow", f"api_key:{match.name}", "key matched")
        return None


def build_api_key_authn(authn: ServiceAuthn, keys: Mapping[str, ApiKey], *,
                        audit: AuditRecorder | None = None,
                        realm: str = "pake") -> ApiKeyAuthnFilter:
    """The filter for one service's ``authn`` (``authn.api_keys`` must not be empty)."""
    return ApiKeyAuthnFilter(tuple(keys[name] for name in authn.api_keys),
                             required=authn.required, accepts_jwt=bool(authn.jwt),
                             audit=audit, realm=realm)
