"""The checks a token must pass before its claims are believed.

``parse_token`` reads the JWS compact serialization exactly as RFC 7515 §7.1 and RFC 7519
§7.2 define it, so each token has one textual form: exactly three segments and two dots;
each segment base64url (RFC 7515 §2: the URL-safe alphabet, no ``=`` padding, no whitespace,
line breaks or other characters) and canonical (the unused low bits of the last character are
zero: otherwise several texts decode to the same bytes, and a third party could re-spell a
token's signature); a non-empty signature; header and payload UTF-8 JSON objects whose
members are unique, without NaN/Infinity or nesting past the parser's depth
(``sidecar/strict_json.py``), and whose strings are valid Unicode (no unpaired surrogate
escapes). The header must describe a plain JWS: ``enc`` (a JWE header) and ``cty: JWT``
(a nested token) are refused, ``typ`` and ``cty`` must be strings. The JWS JSON
serialization is not accepted (it fails the alphabet). ``Verifier`` then refuses, cheapest
first: ``alg: none``, HS* (our keys are public keys: algorithm
confusion), algorithms outside the provider's allow-list, ``jku``/``x5u``/``jwk``/``x5c``
headers (keys named by the token are never followed), any ``crit`` (we implement no
extension), a wrong ``typ``, an unknown ``kid`` (and asks the JWKS cache to refetch, off the
hot path), time claims that are not finite JSON numbers (RFC 7519 §2 NumericDate: ``1e400``
would be a token that never expires), a missing ``exp``, expiry, ``nbf`` and
``iat`` with leeway, issuer, audience and required claims; last, the signature, with PyJWT
and the resolved key under ``algorithms=[alg]``. Every refusal is a ``JwtError`` whose
description is ours, short, and never contains the token.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jwt
from jwt.exceptions import InvalidSignatureError, PyJWTError

from ..config.jwt_providers import JwtProvider
from ..strict_json import DuplicateMember, strict_json
from .jwks import JwksCache

if TYPE_CHECKING:
    from jwt.types import Options

__all__ = ["JwtError", "ParsedToken", "VerifiedToken", "Verifier", "parse_token"]

_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"  # RFC 4648 §5
_B64URL = re.compile(r"[A-Za-z0-9_-]*")  # used with fullmatch: "$" would allow a final "\n"
# A last character after 2 or 3 characters in its quantum carries 4 or 2 unused bits.
_UNUSED_BITS_MASK = {2: 0x0F, 3: 0x03}
_KEY_HEADERS = ("jku", "x5u", "jwk", "x5c")
# Claims are checked by us, with our clock and leeway; PyJWT checks the signature only.
_SIGNATURE_ONLY: Options = {
    "verify_signature": True, "verify_exp": False, "verify_nbf": False, "verify_iat": False,
    "verify_aud": False, "verify_iss": False, "verify_sub": False, "verify_jti": False,
    "require": [], "enforce_minimum_key_length": True,
}


class JwtError(Exception):
    """A refused token. ``description`` goes into ``WWW-Authenticate``; ``reason`` is a
    short code for logs and metrics."""

    def __init__(self, description: str, reason: str, error: str = "invalid_token") -> None:
        super().__init__(description)
        self.description = description
        self.reason = reason
        self.error = error


@dataclass(frozen=True, slots=True)
class ParsedToken:
    raw: str
    header: dict[str, Any]
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    provider: str
    principal: str
    roles: frozenset[str]
    claims: dict[str, Any]  # shared by cache hits: callers copy before handing it out
    exp: float
    kid: str | None
    alg: str


def _segment(seg: str, what: str) -> bytes:
    """One base64url segment, RFC 7515 §2: alphabet, no padding, canonical last character."""
    if not _B64URL.fullmatch(seg) or len(seg) % 4 == 1:
        raise JwtError(f"malformed token {what}", "malformed")
    mask = _UNUSED_BITS_MASK.get(len(seg) % 4)
    if mask is not None and _ALPHABET.index(seg[-1]) & mask:
        raise JwtError(f"non-canonical base64url in token {what}", "malformed")
    try:
        return base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4))
    except (binascii.Error, ValueError):  # pragma: no cover - the checks above cover it
        raise JwtError(f"malformed token {what}", "malformed") from None


def _valid_unicode(value: Any) -> bool:
    """No unpaired surrogate (``"\\ud800"``) in any string or member name: such a string is
    not Unicode text (RFC 8259 §8.2), and readers disagree on what it is. Iterative: the
    parser already bounded the depth, this walk must not hit the recursion limit either."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def _object(seg: str, what: str) -> dict[str, Any]:
    try:
        value = strict_json(_segment(seg, what))
    except JwtError:
        raise
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        reason = "duplicate" if isinstance(exc, DuplicateMember) else "malformed"
        text = f"duplicate member in token {what}" if reason == "duplicate" else \
            f"token {what} is not JSON"
        raise JwtError(text, reason) from None
    if not isinstance(value, dict):
        raise JwtError(f"token {what} is not a JSON object", "malformed")
    if not _valid_unicode(value):
        raise JwtError(f"token {what} is not valid Unicode", "malformed")
    return value


def _media_type(value: str) -> str:
    # RFC 7515 §4.1.9/§4.1.10: media types compare case-insensitively; "application/" may be omitted.
    value = value.lower()
    return value[len("application/"):] if value.startswith("application/") else value


def _check_jws_header(header: dict[str, Any]) -> None:
    """RFC 7519 §7.2 steps 6 and 8: a plain JWS, not a JWE nor a nested JWT."""
    if "enc" in header:
        raise JwtError("encrypted tokens (JWE) are not accepted", "encrypted")
    for name in ("typ", "cty"):
        if name in header and not isinstance(header[name], str):
            raise JwtError(f"malformed {name}", "malformed")
    if "cty" in header and _media_type(header["cty"]) == "jwt":
        raise JwtError("nested tokens are not accepted", "nested")


def parse_token(token: str, max_size: int) -> ParsedToken:
    """The decoded header and payload of a compact JWS (signature not yet checked, but its
    text checked: it is the one part the signature does not cover)."""
    if len(token) > max_size:
        raise JwtError("token too large", "too_large")
    parts = token.split(".")
    if len(parts) != 3:
        # Five parts is a JWE (encrypted); we only accept signed tokens.
        raise JwtError("malformed token", "malformed")
    if not parts[2]:
        raise JwtError("token is not signed", "no_signature")
    header = _object(parts[0], "header")
    _check_jws_header(header)
    payload = _object(parts[1], "payload")
    _segment(parts[2], "signature")
    return ParsedToken(raw=token, header=header, payload=payload)


def _number(value: Any) -> bool:
    """An RFC 7519 §2 NumericDate: a JSON number (``true`` is an int in Python, not a JSON
    number), finite and within a float's range (``1e400`` parses as infinity: a token that
    never expires; a 400-digit integer would overflow ``float()`` later)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


class Verifier:
    """One provider's checks. Built once per snapshot; ``verify`` runs per token."""

    def __init__(self, provider: JwtProvider, jwks: JwksCache, *,
                 wall: Callable[[], float] = time.time) -> None:
        self.provider = provider
        self.jwks = jwks
        self.wall = wall
        self._audiences = frozenset(provider.audiences)
        self._typ = _media_type(provider.typ) if provider.typ else None

    def verify(self, token: ParsedToken) -> VerifiedToken:
        p = self.provider
        header, claims = token.header, token.payload
        alg = header.get("alg")
        if not isinstance(alg, str) or not alg:
            raise JwtError("token has no alg", "malformed")
        if alg.lower() == "none":
            raise JwtError("unsigned tokens (alg none) are not accepted", "alg_none")
        if alg.upper().startswith("HS"):
            raise JwtError("symmetric algorithms are not accepted", "alg_symmetric")
        if alg not in p.algorithms:
            raise JwtError("algorithm not allowed", "alg_not_allowed")
        for name in _KEY_HEADERS:
            if name in header:
                raise JwtError(f"tokens naming their own key ({name}) are not accepted",
                               "key_in_header")
        if "crit" in header:
            raise JwtError("unsupported critical header", "crit")
        if self._typ is not None:
            typ = header.get("typ")
            if not isinstance(typ, str) or _media_type(typ) != self._typ:
                raise JwtError("wrong token type", "typ")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise JwtError("malformed kid", "malformed")
        self._check_claims(claims)
        key = self.jwks.lookup(kid, alg)
        if key is None:
            if kid is None:
                raise JwtError("token has no kid", "no_kid")
            self.jwks.request_refetch()  # this token is refused now; a later one may pass
            raise JwtError("unknown signing key", "unknown_kid")
        pyjwk = key.for_alg(alg)
        if pyjwk is None:
            raise JwtError("signing key does not match the algorithm", "key_alg")
        try:
            jwt.decode(token.raw, pyjwk, algorithms=[alg], options=_SIGNATURE_ONLY)
        except InvalidSignatureError:
            raise JwtError("invalid signature", "signature") from None
        except PyJWTError as exc:
            raise JwtError("invalid token", type(exc).__name__) from None
        principal: str = claims[p.principal_claim]  # checked: a non-empty string
        return VerifiedToken(provider=p.name, principal=principal, roles=self._roles(claims),
                             claims=claims, exp=float(claims["exp"]), kid=kid, alg=alg)

    def _check_claims(self, claims: dict[str, Any]) -> None:
        p = self.provider
        for name in ("exp", "nbf", "iat"):
            if name in claims and not _number(claims[name]):
                raise JwtError(f"{name} is not a number", "time_type")
        if "exp" not in claims:
            raise JwtError("token has no exp", "no_exp")
        now = self.wall()
        if now > claims["exp"] + p.leeway:
            raise JwtError("token expired", "expired")
        if "nbf" in claims and now + p.leeway < claims["nbf"]:
            raise JwtError("token not yet valid", "nbf")
        if "iat" in claims and now + p.leeway < claims["iat"]:
            raise JwtError("token issued in the future", "iat")
        if claims.get("iss") != p.issuer:
            raise JwtError("wrong issuer", "iss")
        aud = claims.get("aud")
        auds = [aud] if isinstance(aud, str) else aud
        if not isinstance(auds, list) or not any(
                isinstance(a, str) and a in self._audiences for a in auds):
            raise JwtError("wrong audience", "aud")
        for name in p.required_claims:
            if name not in claims:
                raise JwtError(f"missing claim {name}", "required_claim")
        principal = claims.get(p.principal_claim)
        if not isinstance(principal, str) or not principal:
            raise JwtError(f"missing claim {p.principal_claim}", "required_claim")

    def _roles(self, claims: dict[str, Any]) -> frozenset[str]:
        if self.provider.roles_claim is None:
            return frozenset()
        value = claims.get(self.provider.roles_claim)
        if isinstance(value, str):
            return frozenset(value.split())  # OAuth `scope` style: space-separated
        if isinstance(value, list):
            return frozenset(v for v in value if isinstance(v, str))
        return frozenset()
