"""The ``jwt_providers`` section of the mesh config: who issues the tokens a gateway accepts.

Frozen dataclasses and their parsers (``policy.py`` shows the whole section in context).
Pure: no I/O and no PyJWT import; the keys are fetched by ``sidecar/jwt`` when a service
uses the provider. Only asymmetric algorithms, and a JWKS URL only over https (http on
loopback alone), so nothing here can be turned into algorithm confusion or a key fetched
in clear.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from ..http.headers import RESERVED_HEADERS
from .reader import ENTRY_NAME, Fields, header_name, is_loopback_host, strings_of

__all__ = [
    "ALGORITHMS",
    "DEFAULT_TOKEN_HEADERS",
    "JwtProvider",
    "TokenHeader",
    "parse_jwt_provider",
    "parse_jwt_providers",
]

# Asymmetric algorithms only: with a JWKS of public keys, an HS* token would be "signed"
# with a public key as the HMAC secret (algorithm confusion), so HS* is never accepted.
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
              "ES256", "ES384", "ES512", "EdDSA")
# Headers that carry framing, routing or credentials: a claim must not overwrite them.
_FORBIDDEN_TARGETS = frozenset({
    "host", "content-length", "transfer-encoding", "connection", "te", "upgrade", "trailer",
    "keep-alive", "proxy-connection", "expect", "authorization", "proxy-authorization",
    "cookie", "x-api-key", *RESERVED_HEADERS,
})


@dataclass(frozen=True, slots=True)
class TokenHeader:
    name: str  # lower-case header name
    value_prefix: str = ""  # e.g. "Bearer "; compared case-insensitively


DEFAULT_TOKEN_HEADERS = (TokenHeader("authorization", "Bearer "),)


@dataclass(frozen=True, slots=True)
class JwtProvider:
    name: str
    issuer: str
    audiences: tuple[str, ...]
    algorithms: frozenset[str] = frozenset({"RS256"})
    jwks_file: str | None = None
    jwks_uri: str | None = None
    refresh_interval: float = 600.0
    min_refetch_interval: float = 30.0
    fetch_timeout: float = 5.0
    max_jwks_size: int = 256 * 1024
    leeway: float = 30.0
    required_claims: tuple[str, ...] = ()
    typ: str | None = None
    max_token_size: int = 8 * 1024
    from_headers: tuple[TokenHeader, ...] = DEFAULT_TOKEN_HEADERS
    from_params: tuple[str, ...] = ()
    principal_claim: str = "sub"
    roles_claim: str | None = "roles"
    claims_to_headers: tuple[tuple[str, str], ...] = ()  # (claim, lower-case header)
    forward: bool = True



def _jwks_uri(node: Fields) -> str | None:
    uri: str | None = node.str("jwks_uri", None)
    if uri is None:
        return None
    parts = urlsplit(uri)
    host = parts.hostname or ""
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        node.error("jwks_uri", f"has an invalid port: {uri!r}")
        return None
    if parts.scheme == "https" and host:
        pass
    elif parts.scheme == "http" and host and is_loopback_host(host):
        pass  # loopback only: tests and a local issuer; nothing crosses a network in clear
    else:
        node.error("jwks_uri", f"must be an https:// URL (http only on loopback), got {uri!r}")
        return None
    if parts.username or parts.password or parts.fragment:
        node.error("jwks_uri", "must not carry user info or a fragment")
        return None
    return uri


def _algorithms(node: Fields) -> frozenset[str]:
    out = set()
    for path, item in node.list("algorithms", ["RS256"]):
        if item in ALGORITHMS:
            out.add(item)
        elif isinstance(item, str) and item.upper().startswith("HS"):
            node.problems.add(path, f"symmetric algorithm {item!r} is not accepted: keys come "
                                    "from a JWKS of public keys (algorithm confusion)")
        elif isinstance(item, str) and item.lower() == "none":
            node.problems.add(path, "'none' is never accepted: tokens must be signed")
        else:
            node.problems.add(path, f"must be one of {', '.join(ALGORITHMS)}, got {item!r}")
    if node.has("algorithms") and node.data["algorithms"] == []:
        node.error("algorithms", "must name at least one algorithm")
    return frozenset(out)


def _token_headers(node: Fields) -> tuple[TokenHeader, ...]:
    if not node.has("from_headers"):
        node.raw("from_headers", None)
        return DEFAULT_TOKEN_HEADERS
    out = []
    for path, item in node.list("from_headers"):
        sub = Fields(item, path, node.problems)
        name = sub.str("name")
        prefix = sub.raw("value_prefix", "")
        sub.done()
        if not isinstance(prefix, str):
            sub.error("value_prefix", f"must be a string, got {prefix!r}")
            continue
        if isinstance(name, str):
            lname = header_name(sub, "name", name)
            if lname is not None:
                out.append(TokenHeader(lname, prefix))
    return tuple(out)


def _claims_to_headers(node: Fields) -> tuple[tuple[str, str], ...]:
    sub = node.sub("claims_to_headers")
    out = []
    seen: set[str] = set()
    for claim, header in sub.data.items():
        sub.raw(claim)
        name = header_name(sub, str(claim), header)
        if name is None:
            continue
        if name in _FORBIDDEN_TARGETS:
            sub.error(str(claim), f"header {name!r} is reserved and cannot carry a claim")
        elif name in seen:
            sub.error(str(claim), f"header {name!r} already carries another claim")
        else:
            seen.add(name)
            out.append((str(claim), name))
    return tuple(out)


def parse_jwt_provider(name: str, node: Fields) -> JwtProvider:
    d = JwtProvider(name="", issuer="", audiences=())
    issuer = node.str("issuer")
    audiences = strings_of(node, "audiences")
    if not audiences:
        node.error("audiences", "is required: tokens minted for other audiences must be refused")
    algorithms = _algorithms(node)
    jwks_file = node.str("jwks_file", None)
    jwks_uri = _jwks_uri(node)
    if node.has("jwks_file") == node.has("jwks_uri"):
        node.problems.add(node.path, "exactly one of jwks_file, jwks_uri is required")
    typ = node.str("typ", None)
    provider = JwtProvider(
        name=name,
        issuer=issuer or "",
        audiences=audiences,
        algorithms=algorithms,
        jwks_file=jwks_file,
        jwks_uri=jwks_uri,
        refresh_interval=node.duration("refresh", d.refresh_interval, min=1.0),
        min_refetch_interval=node.duration("min_refetch_interval", d.min_refetch_interval,
                                           min=0.1),
        fetch_timeout=node.duration("fetch_timeout", d.fetch_timeout, min=0.01),
        max_jwks_size=node.size("max_jwks_size", d.max_jwks_size),
        leeway=node.duration("leeway", d.leeway),
        required_claims=strings_of(node, "required_claims"),
        typ=typ,
        max_token_size=node.size("max_token_size", d.max_token_size),
        from_headers=_token_headers(node),
        from_params=strings_of(node, "from_params"),
        principal_claim=node.str("principal_claim", d.principal_claim),
        roles_claim=node.str("roles_claim", d.roles_claim),
        claims_to_headers=_claims_to_headers(node),
        forward=node.bool("forward", d.forward),
    )
    if not provider.from_headers and not provider.from_params:
        node.problems.add(node.path, "from_headers and from_params must not both be empty")
    node.done()
    return provider


def parse_jwt_providers(top: Fields) -> dict[str, JwtProvider]:
    """The top-level ``jwt_providers`` map."""
    providers = {}
    for name, node in top.items("jwt_providers"):
        if not ENTRY_NAME.match(name):
            node.problems.add(node.path, f"provider name must match {ENTRY_NAME.pattern}, got {name!r}")
            continue
        providers[name] = parse_jwt_provider(name, node)
    issuers: dict[str, str] = {}
    for provider in providers.values():
        other = issuers.setdefault(provider.issuer, provider.name)
        if other != provider.name and provider.issuer:
            top.problems.add(f"{top.at('jwt_providers')}.{provider.name}.issuer",
                             f"issuer is already used by provider {other!r}")
    return providers
