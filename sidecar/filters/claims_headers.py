"""Headers the sidecar vouches for: identity and verified claims, passed to the app.

Rule: an app may trust ``x-pake-*`` identity headers and configured claim headers only
because they can never come from outside. So the ``sanitize_headers`` filter, first on
every listener that accepts requests from outside the pod (inbound and gateway), removes
them all before any authentication runs; the authn filters then set them from what they
verified. A claim becomes a header only when its value is a string, number, boolean or
list of strings without control characters (no header injection), at most 4 KiB.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any, Final

from ..config.jwt_providers import JwtProvider
from ..errors import LocalReply
from ..exchange import Exchange
from ..http.headers import RESERVED_HEADERS
from ..http.message import RequestHead

__all__ = [
    "PEER_IDENTITY_HEADER",
    "PRINCIPAL_HEADER",
    "ROLES_HEADER",
    "HeaderSanitizer",
    "build_header_sanitizer",
    "claim_header_value",
    "set_identity_headers",
]

PEER_IDENTITY_HEADER: Final = b"x-pake-peer-identity"  # set by the mTLS side, stripped here first
PRINCIPAL_HEADER: Final = b"x-pake-principal"
ROLES_HEADER: Final = b"x-pake-roles"
MAX_VALUE: Final = 4096
_CONTROL: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # CTLs but HTAB: CR/LF would inject


def claim_header_value(value: Any) -> bytes | None:
    """The header form of a claim, or None when it has no safe one."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (int, float)):
        text = json.dumps(value)
    elif isinstance(value, str):
        text = value
    elif isinstance(value, list) and all(isinstance(v, str) and "," not in v for v in value):
        text = ",".join(value)
    else:
        return None
    if len(text) > MAX_VALUE or _CONTROL.search(text):
        return None
    return text.encode("utf-8")


def set_identity_headers(request: RequestHead, principal: str | None,
                         roles: Iterable[str]) -> None:
    """``x-pake-principal`` and ``x-pake-roles`` (sorted, comma-separated) for the app.
    The caller has already removed both (so this appends, without another scan)."""
    value = claim_header_value(principal) if principal else None
    if value is not None:
        request.headers.append((PRINCIPAL_HEADER, value))
    listed = claim_header_value(sorted(roles))
    if listed:
        request.headers.append((ROLES_HEADER, listed))


class HeaderSanitizer:
    """Removes every header only the sidecar may set. No reply; never refuses."""

    name = "sanitize_headers"

    def __init__(self, names: Iterable[bytes]) -> None:
        self.names = tuple(sorted(set(names)))

    def on_request(self, exchange: Exchange) -> LocalReply | None:
        exchange.request.remove_headers(*self.names)
        return None


def build_header_sanitizer(providers: Iterable[JwtProvider] = (),
                           extra: Iterable[str] = ()) -> HeaderSanitizer:
    """Strips the reserved ``x-pake-*`` headers plus every claim header any provider of the
    mesh may set (pass them all: a service that does not verify tokens must still not let
    a forged ``x-user`` through)."""
    names = {h.encode("latin-1") for h in RESERVED_HEADERS}
    for provider in providers:
        names.update(header.encode("latin-1") for _, header in provider.claims_to_headers)
    names.update(h.lower().encode("latin-1") for h in extra)
    return HeaderSanitizer(names)
