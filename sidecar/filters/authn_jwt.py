"""The ``authn_jwt`` filter: a request's bearer token, verified, becomes its principal.

Per exchange: strip the claim and identity headers outsiders may not set; extract at most
one token; verify it (``sidecar.jwt``: cached, no I/O); on success set ``principal``
(the provider's ``principal_claim``, ``sub`` by default), ``claims``, ``roles``, the
configured claim headers and ``x-pake-principal``/``x-pake-roles``, and record an audit
``allow``. Refusals are 401 with flag ``UAEX`` and ``WWW-Authenticate: Bearer`` (an
``invalid_token`` error and a description for a bad token, a bare challenge for a missing
one) and an audit ``deny``. A missing token passes when the service does not require
authentication, or when API keys are accepted too (the ``authn_api_key`` filter after this
one then decides, and records the decision).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from typing import Final

from ..audit import AuditRecorder
from ..config.jwt_providers import JwtProvider, TokenHeader
from ..config.policy import ServiceAuthn
from ..errors import LocalReply, Unauthenticated
from ..exchange import Exchange
from ..jwt.authenticator import Authenticator
from ..jwt.extractor import ExtractError, Found, extract_token, header_specs, remove_param
from ..jwt.jwks import JwksCache
from ..jwt.verifier import JwtError, Verifier
from .claims_headers import PRINCIPAL_HEADER, ROLES_HEADER, claim_header_value, set_identity_headers

__all__ = ["JwtAuthnFilter", "bearer_challenge", "build_jwt_authn"]

_UNSAFE: Final = re.compile(r'[^\x20-\x7e]|["\\]')


def bearer_challenge(realm: str, error: str | None = None,
                     description: str | None = None) -> bytes:
    """A ``WWW-Authenticate`` value. The description is ours (never the token) and is
    reduced to the characters RFC 6750 §3 allows inside the quotes."""
    value = f'Bearer realm="{_UNSAFE.sub("", realm)}"'
    if error:
        value += f', error="{error}"'
    if description:
        value += f', error_description="{_UNSAFE.sub(chr(39), description)[:200]}"'
    return value.encode("ascii")


class JwtAuthnFilter:
    name = "authn_jwt"

    def __init__(self, authenticator: Authenticator, providers: tuple[JwtProvider, ...], *,
                 required: bool, decides_anonymous: bool, audit: AuditRecorder | None = None,
                 realm: str = "pake") -> None:
        # decides_anonymous: no authn_api_key filter follows, so a request without a token
        # is this filter's decision; when one follows, a token next to an API key is refused
        # here, so every exchange gets exactly one authn decision.
        self.authenticator = authenticator
        self.providers = {p.name: p for p in providers}
        self.required = required
        self.decides_anonymous = decides_anonymous
        self.audit = audit
        self.realm = realm
        locations: list[TokenHeader] = []
        params: dict[str, None] = {}
        strip = {PRINCIPAL_HEADER, ROLES_HEADER}
        for p in providers:
            locations.extend(p.from_headers)
            params.update(dict.fromkeys(p.from_params))
            strip.update(header.encode("latin-1") for _, header in p.claims_to_headers)
        self._headers = header_specs(locations)
        self._params = tuple(params)
        self._strip = tuple(strip)
        # Counters, read by metrics.
        self.allowed = 0
        self.denied = 0

    def _deny(self, exchange: Exchange, description: str, reason: str,
              error: str | None = "invalid_token") -> LocalReply:
        self.denied += 1
        exchange.tag("authn", "jwt")
        exchange.tag("authn_result", reason)
        if self.audit is not None:
            self.audit.record(exchange, "authn", "deny", self.name, description)
        challenge = bearer_challenge(self.realm, error, description if error else None)
        return Unauthenticated(description, headers=((b"www-authenticate", challenge),)).reply()

    def on_request(self, exchange: Exchange) -> LocalReply | None:
        request = exchange.request
        # Even a request that fails below must not reach anything with forged headers.
        request.remove_headers(*self._strip)
        try:
            found = extract_token(request, self._headers, self._params)
        except ExtractError as exc:
            return self._deny(exchange, exc.description, "ambiguous", "invalid_request")
        if found is None:
            if self.required:
                return self._deny(exchange, "missing token", "missing", None)
            if self.decides_anonymous and self.audit is not None:
                self.audit.record(exchange, "authn", "allow", self.name,
                                  "no credential (authentication optional)")
            return None
        if not self.decides_anonymous and request.header(b"x-api-key") is not None:
            return self._deny(exchange, "more than one credential", "ambiguous",
                              "invalid_request")
        try:
            verified = self.authenticator.authenticate(found.token)
        except JwtError as exc:
            return self._deny(exchange, exc.description, exc.reason)
        provider = self.providers[verified.provider]
        exchange.principal = verified.principal
        exchange.claims = dict(verified.claims)  # cached tokens share theirs: copy
        exchange.roles = verified.roles
        exchange.tag("authn", "jwt")
        exchange.tag("authn_provider", provider.name)
        for claim, header in provider.claims_to_headers:
            value = claim_header_value(verified.claims.get(claim))
            if value is not None:  # stripped above: append, no second scan
                request.headers.append((header.encode("latin-1"), value))
        set_identity_headers(request, verified.principal, verified.roles)
        if not provider.forward:
            _remove_token(exchange, found)
        self.allowed += 1
        if self.audit is not None:
            self.audit.record(exchange, "authn", "allow", f"jwt:{provider.name}",
                              "token verified")
        return None


def _remove_token(exchange: Exchange, found: Found) -> None:
    request = exchange.request
    if found.location.header is not None:
        request.remove_headers(found.location.header)
    elif found.location.param is not None:
        request.target = remove_param(request.target, found.location.param)


def build_jwt_authn(authn: ServiceAuthn, providers: Mapping[str, JwtProvider],
                    caches: Mapping[str, JwksCache], *, audit: AuditRecorder | None = None,
                    wall: Callable[[], float] = time.time, realm: str = "pake") -> JwtAuthnFilter:
    """The filter for one service's ``authn`` (``authn.jwt`` must not be empty). ``caches``
    come from ``sidecar.jwt.jwks.build_jwks_caches`` and are started by the caller."""
    chosen = tuple(providers[name] for name in authn.jwt)
    verifiers = {p.name: Verifier(p, caches[p.name], wall=wall) for p in chosen}
    authenticator = Authenticator(verifiers, cache_size=authn.token_cache, wall=wall)
    return JwtAuthnFilter(
        authenticator, chosen,
        # With API keys also accepted, a missing token is the API-key filter's call.
        required=authn.required and not authn.api_keys,
        decides_anonymous=not authn.api_keys,
        audit=audit, realm=realm)
