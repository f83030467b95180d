"""Where a token is read from: the configured headers (``Authorization: Bearer`` by default)
and query parameters.

Rules: exactly zero or one token per request. Two tokens, whether two ``Authorization``
headers, a header and a query parameter, or the same parameter twice, are refused rather
than guessed between (RFC 6750 §2: a client uses one method), because a proxy and the app
behind it could otherwise read different tokens. Around a header's token only HTTP's optional
whitespace (SP, HTAB) is dropped, and nothing around a query parameter's: a token wrapped in
other characters (VT, FF, a percent-encoded line break or NBSP) is not quietly unwrapped
into a form RFC 6750 and RFC 7515 do not allow; the token parser then refuses it. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote

from ..config.jwt_providers import TokenHeader
from ..http.message import RequestHead

__all__ = ["ExtractError", "Found", "HeaderSpec", "TokenLocation", "extract_token",
           "header_specs", "remove_param"]

HeaderSpec = tuple[bytes, bytes]  # (lower-case header name, lower-case value prefix)
_OWS = b" \t"  # RFC 9110 §5.6.3


class ExtractError(Exception):
    """The request's credentials are ambiguous or malformed: 401 ``invalid_request``."""

    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description


@dataclass(frozen=True, slots=True)
class TokenLocation:
    header: bytes | None = None  # lower-case header name, or
    param: str | None = None  # a query parameter name


@dataclass(frozen=True, slots=True)
class Found:
    token: str
    location: TokenLocation


def _query_values(target: bytes, name: str) -> list[str]:
    _, sep, query = target.partition(b"?")
    if not sep:
        return []
    out = []
    for pair in query.split(b"&"):
        key, _, value = pair.partition(b"=")
        if unquote(key.decode("latin-1")) == name:
            out.append(unquote(value.decode("latin-1").replace("+", " ")))
    return out


def remove_param(target: bytes, name: str) -> bytes:
    """``target`` without every ``name=`` query parameter (for ``forward: false``)."""
    path, sep, query = target.partition(b"?")
    if not sep:
        return target
    kept = [p for p in query.split(b"&")
            if unquote(p.partition(b"=")[0].decode("latin-1")) != name]
    return path + (b"?" + b"&".join(kept) if kept else b"")


def header_specs(headers: Iterable[TokenHeader]) -> tuple[HeaderSpec, ...]:
    """Config locations in the form ``extract_token`` reads (built once, not per request)."""
    specs = {(h.name.encode("latin-1"), h.value_prefix.lower().encode("latin-1")): None
             for h in headers}
    return tuple(specs)


def extract_token(request: RequestHead, headers: Iterable[HeaderSpec],
                  params: Iterable[str] = ()) -> Found | None:
    """The one token in ``request``, None if there is none, ``ExtractError`` if ambiguous."""
    found: list[Found] = []
    if len(request.header_values(b"authorization")) > 1:
        raise ExtractError("more than one Authorization header")
    for name, prefix in headers:
        values = request.header_values(name)
        if len(values) > 1:
            raise ExtractError(f"more than one {name.decode('latin-1')} header")
        for value in values:
            if value[:len(prefix)].lower() != prefix:
                continue  # another scheme (e.g. "ApiKey"): not ours
            text = value[len(prefix):].strip(_OWS).decode("latin-1")
            found.append(Found(text, TokenLocation(header=name)))
    for param in params:
        for item in _query_values(request.target, param):
            found.append(Found(item, TokenLocation(param=param)))
    if len(found) > 1:
        raise ExtractError("more than one token in the request")
    if not found:
        return None
    if not found[0].token:
        raise ExtractError("empty token")
    return found[0]
