"""Who may call what: the config of authentication, RBAC, rate limits, validation and audit.

Frozen slotted dataclasses and the ``parse_*`` functions that read them with ``Fields``
(every problem names its path; unknown keys are errors). Pure: no I/O, no PyJWT or
jsonschema import unless a JSON Schema is configured inline (it is checked at load).
Rules: a secret never appears in an error or a dump: an API key is configured only as
``sha256:<hex>`` and a plain key is refused *without echoing it*; ``redact()`` turns API-key
hashes and anything token-like into ``"<redacted>"`` for config dumps.

Where it sits in the mesh config (``mesh.yaml``)::

    jwt_providers:                    # top level: name -> provider, shared by services
      pake-issuer:
        issuer: https://issuer.pake.local
        audiences: [pake]             # required: a token for another audience is refused
        algorithms: [RS256]           # allow-list (default [RS256]); HS*/none are refused
        jwks_file: jwks.json          # or jwks_uri: https://issuer.pake.local/jwks.json
        refresh: 10m                  # background refresh of the key set
        min_refetch_interval: 30s     # unknown `kid`: at most one refetch per interval
        fetch_timeout: 5s
        max_jwks_size: 256KiB
        leeway: 30s                   # for exp / nbf / iat
        required_claims: [sub]        # `exp` is always required
        typ: JWT                      # optional: the header `typ` that must be present
        max_token_size: 8KiB
        from_headers: [{name: authorization, value_prefix: "Bearer "}]   # the default
        from_params: []               # e.g. [access_token]; off by default (URLs get logged)
        principal_claim: sub
        roles_claim: roles            # a list of strings or a space-separated string
        claims_to_headers: {sub: x-user, email: x-user-email}
        forward: true                 # keep the token for the upstream (its sidecar re-verifies)
    api_keys:                         # top level: name -> key, stored as a hash only
      ci-bot: {hash: "sha256:<64 hex>", principal: ci-bot, roles: [deployer]}
    services:
      orders:
        authn:                        # which credentials this service's sidecar accepts
          jwt: [pake-issuer]
          api_keys: [ci-bot]
          required: true              # no credential -> 401 (false: anonymous, RBAC decides)
          token_cache: 1024           # verified tokens kept (bounded LRU)
        policy:                       # RBAC; a service with a policy denies by default
          default: deny               # deny | allow
          dry_run: false              # compute, log, count, but do not enforce
          rules:                      # deny rules win; the first matching allow rule allows
            - name: frontend-reads    # optional; default "rules[i]"
              allow:                  # all given fields must match; any item in a list
                from: [frontend, "spiffe://pake.local/service/batch-*"]
                principals: ["alice", "svc-*"]
                claims: {iss: "https://issuer.pake.local", roles: {contains: admin}}
                api_key_roles: [deployer]
                methods: [GET, HEAD]
                paths: ["/orders", "/orders/*", "/orders/**", {prefix: /orders/}]
                headers: {x-tenant: acme}
            - deny: {paths: ["/admin/**"]}
              unless: {claims: {roles: {contains: admin}}}   # optional exception
        routes:
          - match: {path_prefix: /orders/}
            rate_limit: {rate: 100/s, burst: 100, key: subject, max_keys: 10000}
            validation:
              methods: [GET, POST]
              max_body: 64KiB
              content_types: [application/json]
              json_schema: {type: object, required: [id]}   # or {file: schemas/order.json}

Path patterns: a plain path is exact; ``*`` matches one or more characters within one
segment (``/orders/*`` matches ``/orders/1``, not ``/orders/1/items`` nor ``/orders/``);
``**`` matches anything, ``/`` included (``/orders/**`` matches ``/orders/`` and below);
``{prefix: /orders/}`` is a plain prefix. ``from`` takes service names (expanded to
``spiffe://<trust domain>/service/<name>``) or SPIFFE IDs, with ``*`` for one segment;
``from: ["*"]`` is any mTLS peer. ``principals`` take ``*`` for any characters. A rule's
``unless`` (same fields) is its exception: "deny /admin/** unless the caller is an admin".

The audit sink is the sidecar's own (bootstrap ``sidecar.yaml``)::

    audit: {path: stdout, max_size: 10MiB, keep: 5, queue: 10000, warn_interval: 10s}
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from .reader import Fields

__all__ = [
    "ALGORITHMS",
    "REDACTED",
    "RESERVED_HEADERS",
    "ApiKey",
    "AuditConfig",
    "ClaimMatch",
    "JwtProvider",
    "MeshPolicy",
    "PathMatch",
    "RateLimitConfig",
    "RbacMatch",
    "RbacPolicy",
    "RbacRule",
    "ServiceAuthn",
    "TokenHeader",
    "ValidationConfig",
    "check_json_schema",
    "is_loopback_host",
    "parse_api_key",
    "parse_api_keys",
    "parse_audit",
    "parse_authn",
    "parse_jwt_provider",
    "parse_jwt_providers",
    "parse_mesh_policy",
    "parse_optional",
    "parse_rate",
    "parse_rate_limit",
    "parse_rbac_policy",
    "parse_validation",
    "redact",
]

T = TypeVar("T")

# Asymmetric algorithms only: with a JWKS of public keys, an HS* token would be "signed"
# with a public key as the HMAC secret (algorithm confusion), so HS* is never accepted.
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
              "ES256", "ES384", "ES512", "EdDSA")
REDACTED = "<redacted>"
# Headers the sidecar sets for the app after authentication; never taken from outside.
RESERVED_HEADERS = ("x-pake-peer-identity", "x-pake-principal", "x-pake-roles")
# Headers that carry framing, routing or credentials: a claim must not overwrite them.
_FORBIDDEN_TARGETS = frozenset({
    "host", "content-length", "transfer-encoding", "connection", "te", "upgrade", "trailer",
    "keep-alive", "proxy-connection", "expect", "authorization", "proxy-authorization",
    "cookie", "x-api-key", *RESERVED_HEADERS,
})
_HEADER_NAME = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")
_METHOD = re.compile(r"^[A-Z]{1,20}$")
_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,62}[A-Za-z0-9])?$")
_HASH = re.compile(r"^sha256:[0-9a-fA-F]{64}$")
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_RATE_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
               "h": 3600.0, "hour": 3600.0}
_MEDIA_TYPE = re.compile(r"^[a-z0-9!#$&^_.+-]+/([a-z0-9!#$&^_.+-]+|\*)$")


# === JWT providers =======================================================================


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


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str
    # The SHA-256 digest of the key. Not a secret (the key cannot be derived from it), but
    # it is still never shown: it identifies a credential and eases offline guessing.
    hash: bytes = field(repr=False, metadata={"secret": True})
    principal: str = ""
    roles: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class ServiceAuthn:
    jwt: tuple[str, ...] = ()  # provider names, in the order tried (by issuer)
    api_keys: tuple[str, ...] = ()  # api key names
    required: bool = True
    token_cache: int = 1024


@dataclass(frozen=True, slots=True)
class MeshPolicy:
    """The top-level sections: providers and API keys shared by every service."""

    jwt_providers: Mapping[str, JwtProvider] = field(default_factory=dict)
    api_keys: Mapping[str, ApiKey] = field(default_factory=dict)


# === RBAC ================================================================================


@dataclass(frozen=True, slots=True)
class ClaimMatch:
    name: str
    op: Literal["equals", "contains"]
    value: Any  # a JSON scalar


@dataclass(frozen=True, slots=True)
class PathMatch:
    kind: Literal["exact", "prefix", "glob"]
    value: str


@dataclass(frozen=True, slots=True)
class RbacMatch:
    """Every non-empty field must match (AND); within a field any item may (OR)."""

    sources: tuple[str, ...] = ()  # service names or SPIFFE IDs, `*` wildcards
    principals: tuple[str, ...] = ()
    claims: tuple[ClaimMatch, ...] = ()
    api_key_roles: frozenset[str] = frozenset()
    methods: frozenset[str] = frozenset()
    paths: tuple[PathMatch, ...] = ()
    headers: tuple[tuple[str, str], ...] = ()  # (lower-case name, exact value)


@dataclass(frozen=True, slots=True)
class RbacRule:
    name: str
    action: Literal["allow", "deny"]
    match: RbacMatch
    unless: RbacMatch | None = None  # the rule does not apply when this matches


@dataclass(frozen=True, slots=True)
class RbacPolicy:
    default: Literal["allow", "deny"] = "deny"
    dry_run: bool = False
    rules: tuple[RbacRule, ...] = ()


# === routes ==============================================================================


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    rate: float  # tokens per second
    spec: str  # as written, e.g. "100/s", for headers and dumps
    burst: int  # bucket size
    key: Literal["source", "subject", "api_key", "client_ip", "global"] = "client_ip"
    max_keys: int = 10_000


@dataclass(frozen=True, slots=True)
class ValidationConfig:
    methods: frozenset[str] = frozenset()  # empty: any -> else 405
    max_body: int | None = None  # -> 413
    content_types: tuple[str, ...] = ()  # "type/subtype" or "type/*" -> else 415
    json_schema: Mapping[str, Any] | None = None  # inline, already checked
    json_schema_file: str | None = None  # read and checked when the filter is built
    json_schema_path: str = ""  # config path of the schema, for build-time errors


# === audit ===============================================================================


@dataclass(frozen=True, slots=True)
class AuditConfig:
    path: str = "stdout"  # "stdout" or a file path
    max_size: int = 10 * 1024 * 1024  # rotate the file past this
    keep: int = 5  # rotated files kept: audit.log.1 .. audit.log.<keep>
    queue: int = 10_000  # records waiting for the writer; more are dropped and counted
    warn_interval: float = 10.0  # at most one "dropping audit records" warning per this


# === parsing helpers =====================================================================


def parse_optional(parent: Fields, key: str, fn: Callable[[Fields], T]) -> T | None:
    """``fn(parent.sub(key))`` when the key is present, else None (and the key counts as read)."""
    if not parent.has(key) or parent.data[key] is None:
        parent.raw(key, None)
        return None
    return fn(parent.sub(key))


def _strings(node: Fields, key: str, *, pattern: re.Pattern[str] | None = None,
             what: str = "a non-empty string", default: Any = ()) -> tuple[str, ...]:
    out = []
    for path, item in node.list(key, list(default)):
        if not isinstance(item, str) or not item or (pattern and not pattern.match(item)):
            node.problems.add(path, f"must be {what}, got {item!r}")
        else:
            out.append(item)
    return tuple(out)


def _methods(node: Fields, key: str) -> frozenset[str]:
    return frozenset(_strings(node, key, pattern=_METHOD, what="an upper-case HTTP method"))


def _header_name(node: Fields, key: str, name: Any) -> str | None:
    if not isinstance(name, str) or not _HEADER_NAME.match(name.lower()):
        node.error(key, f"must be a header name, got {name!r}")
        return None
    return name.lower()


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# === parse: JWT providers and API keys ===================================================


def _jwks_uri(node: Fields) -> str | None:
    uri = node.str("jwks_uri", None)
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
            lname = _header_name(sub, "name", name)
            if lname is not None:
                out.append(TokenHeader(lname, prefix))
    return tuple(out)


def _claims_to_headers(node: Fields) -> tuple[tuple[str, str], ...]:
    sub = node.sub("claims_to_headers")
    out = []
    seen: set[str] = set()
    for claim, header in sub.data.items():
        sub.raw(claim)
        name = _header_name(sub, str(claim), header)
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
    audiences = _strings(node, "audiences")
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
        required_claims=_strings(node, "required_claims"),
        typ=typ,
        max_token_size=node.size("max_token_size", d.max_token_size),
        from_headers=_token_headers(node),
        from_params=_strings(node, "from_params"),
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
        if not _NAME.match(name):
            node.problems.add(node.path, f"provider name must match {_NAME.pattern}, got {name!r}")
            continue
        providers[name] = parse_jwt_provider(name, node)
    issuers: dict[str, str] = {}
    for provider in providers.values():
        other = issuers.setdefault(provider.issuer, provider.name)
        if other != provider.name and provider.issuer:
            top.problems.add(f"{top.at('jwt_providers')}.{provider.name}.issuer",
                             f"issuer is already used by provider {other!r}")
    return providers


def parse_api_key(name: str, node: Fields) -> ApiKey:
    # Never node.str(...) on a credential: its errors echo the value.
    digest = b""
    if node.has("key") or node.has("api_key"):
        which = "key" if node.has("key") else "api_key"
        node.raw(which)
        node.error(which, "plain API keys are not accepted in config; store "
                          "hash: sha256:<hex of the SHA-256 of the key> instead")
    value = node.raw("hash", None)
    if value is None:
        if not (node.has("key") or node.has("api_key")):
            node.error("hash", "is required (sha256:<64 hex digits>)")
    elif not isinstance(value, str) or not _HASH.match(value):
        length = len(value) if isinstance(value, str) else 0
        node.error("hash", "must be sha256: followed by 64 hex digits, the hash of the key "
                           f"and never the key itself (got {type(value).__name__} of "
                           f"{length} characters; value not shown)")
    else:
        digest = bytes.fromhex(value[len("sha256:"):])
    principal = node.str("principal", name)
    roles = frozenset(_strings(node, "roles"))
    node.done()
    return ApiKey(name=name, hash=digest, principal=principal or name, roles=roles)


def parse_api_keys(top: Fields) -> dict[str, ApiKey]:
    """The top-level ``api_keys`` map."""
    keys = {}
    seen: dict[bytes, str] = {}
    for name, node in top.items("api_keys"):
        if not _NAME.match(name):
            node.problems.add(node.path, f"api key name must match {_NAME.pattern}")
            continue
        key = parse_api_key(name, node)
        if key.hash and seen.setdefault(key.hash, name) != name:
            node.error("hash", f"is the same key as {seen[key.hash]!r}")
        keys[name] = key
    return keys


def parse_mesh_policy(top: Fields) -> MeshPolicy:
    """Reads the top-level ``jwt_providers`` and ``api_keys`` of the mesh config."""
    return MeshPolicy(jwt_providers=parse_jwt_providers(top), api_keys=parse_api_keys(top))


def parse_authn(node: Fields, mesh: MeshPolicy | None = None) -> ServiceAuthn:
    """``services.<name>.authn``; with ``mesh``, names are checked against its sections."""
    jwt = _strings(node, "jwt")
    api_keys = _strings(node, "api_keys")
    authn = ServiceAuthn(
        jwt=jwt,
        api_keys=api_keys,
        required=node.bool("required", True),
        token_cache=node.int("token_cache", 1024, min=0, max=1_000_000),
    )
    if mesh is not None:
        for i, name in enumerate(jwt):
            if name not in mesh.jwt_providers:
                node.problems.add(f"{node.at('jwt')}[{i}]", f"unknown jwt provider {name!r}")
        for i, name in enumerate(api_keys):
            if name not in mesh.api_keys:
                node.problems.add(f"{node.at('api_keys')}[{i}]", f"unknown api key {name!r}")
    if not jwt and not api_keys:
        node.problems.add(node.path, "names no jwt provider and no api key")
    node.done()
    return authn


# === parse: RBAC =========================================================================


def _paths(node: Fields, key: str) -> tuple[PathMatch, ...]:
    out = []
    for path, item in node.list(key):
        if isinstance(item, dict):
            sub = Fields(item, path, node.problems)
            prefix = sub.str("prefix")
            sub.done()
            if isinstance(prefix, str):
                if not prefix.startswith("/"):
                    sub.error("prefix", f"must start with /, got {prefix!r}")
                else:
                    out.append(PathMatch("prefix", prefix))
        elif isinstance(item, str) and item.startswith("/"):
            out.append(PathMatch("glob" if "*" in item else "exact", item))
        else:
            node.problems.add(path, f"must be a path starting with / or {{prefix: ...}}, "
                                    f"got {item!r}")
    return tuple(out)


def _claims(node: Fields) -> tuple[ClaimMatch, ...]:
    sub = node.sub("claims")
    out = []
    for name, value in sub.data.items():
        sub.raw(name)
        if isinstance(value, dict):
            spec = Fields(value, sub.at(str(name)), node.problems)
            contains = spec.raw("contains")
            spec.done()
            if _is_scalar(contains):
                out.append(ClaimMatch(str(name), "contains", contains))
            elif contains is not None:
                spec.error("contains", f"must be a string, number or boolean, got {contains!r}")
        elif _is_scalar(value):
            out.append(ClaimMatch(str(name), "equals", value))
        else:
            sub.error(str(name), "must be a value to equal or {contains: value}, "
                                 f"got {value!r}")
    return tuple(out)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool)) and value is not None


def _rbac_match(node: Fields) -> RbacMatch:
    headers = []
    hnode = node.sub("headers")
    for name, value in hnode.data.items():
        hnode.raw(name)
        lname = _header_name(hnode, str(name), name)
        if lname is None:
            continue
        if not isinstance(value, str):
            hnode.error(str(name), f"must be a string, got {value!r}")
        else:
            headers.append((lname, value))
    match = RbacMatch(
        sources=_strings(node, "from"),
        principals=_strings(node, "principals"),
        claims=_claims(node),
        api_key_roles=frozenset(_strings(node, "api_key_roles")),
        methods=_methods(node, "methods"),
        paths=_paths(node, "paths"),
        headers=tuple(headers),
    )
    node.done()
    return match


def parse_rbac_policy(node: Fields) -> RbacPolicy:
    """``services.<name>.policy``."""
    default = node.str("default", "deny", choices=("deny", "allow"))
    dry_run = node.bool("dry_run", False)
    rules = []
    names: set[str] = set()
    for path, item in node.list("rules"):
        rule = Fields(item, path, node.problems)
        actions = [a for a in ("allow", "deny") if rule.has(a)]
        name = rule.str("name", str(path).rsplit(".", 1)[-1])
        if len(actions) != 1:
            rule.problems.add(path, "must have exactly one of allow, deny")
            rule.raw("allow", None)
            rule.raw("deny", None)
            rule.done()
            continue
        match = _rbac_match(rule.sub(actions[0]))
        unless = parse_optional(rule, "unless", _rbac_match)
        rule.done()
        if name in names:
            rule.error("name", f"{name!r} is used by another rule")
        names.add(name)
        rules.append(RbacRule(name=name, action=actions[0], match=match,  # type: ignore[arg-type]
                              unless=unless))
    node.done()
    return RbacPolicy(default=default, dry_run=dry_run, rules=tuple(rules))


# === parse: rate limits, validation, audit ===============================================


def parse_rate(value: Any) -> tuple[float, float]:
    """``100/s``, ``6000/m``, ``10/h`` -> (count, seconds per unit)."""
    if isinstance(value, str):
        m = _RATE.match(value)
        if m and float(m.group(1)) > 0:
            return float(m.group(1)), _RATE_UNITS[m.group(2)]
    raise ValueError(f"must be a rate like 100/s, 6000/m or 10/h, got {value!r}")


def parse_rate_limit(node: Fields) -> RateLimitConfig:
    """A route's ``rate_limit``. The default burst is one second's worth (at least 1), so a
    client can burst a little but the rate over a few seconds stays close to the rate."""
    spec = node.raw("rate")
    rate, burst_default = 1.0, 1
    if spec is not None:
        try:
            count, unit = parse_rate(spec)
        except ValueError as exc:
            node.error("rate", str(exc))
        else:
            rate = count / unit
            burst_default = max(1, min(int(count), -int(-rate // 1)))
    config = RateLimitConfig(
        rate=rate,
        spec=spec if isinstance(spec, str) else "",
        burst=node.int("burst", burst_default, min=1, max=10_000_000),
        key=node.str("key", "client_ip",
                     choices=("source", "subject", "api_key", "client_ip", "global")),
        max_keys=node.int("max_keys", 10_000, min=1, max=10_000_000),
    )
    node.done()
    return config


def _content_types(node: Fields) -> tuple[str, ...]:
    out = []
    for path, item in node.list("content_types"):
        if isinstance(item, str) and _MEDIA_TYPE.match(item.lower()):
            out.append(item.lower())
        else:
            node.problems.add(path, f"must be a media type like application/json, got {item!r}")
    return tuple(out)


def parse_validation(node: Fields) -> ValidationConfig:
    """A route's ``validation``. An inline schema is checked now (jsonschema is imported only
    then); a schema ``{file: ...}`` is read and checked when the filter is built."""
    methods = _methods(node, "methods")
    max_body = node.size("max_body", None)
    content_types = _content_types(node)
    schema: Mapping[str, Any] | None = None
    schema_file: str | None = None
    schema_path = node.at("json_schema")
    raw = node.raw("json_schema", None)
    if isinstance(raw, dict) and set(raw) == {"file"}:
        sub = Fields(raw, schema_path, node.problems)
        schema_file = sub.str("file")
        sub.done()
    elif isinstance(raw, (dict, bool)):
        for problem in check_json_schema(raw):
            node.problems.add(schema_path, problem)
        schema = raw  # type: ignore[assignment]
    elif raw is not None:
        node.error("json_schema", "must be a JSON Schema mapping or {file: path}")
    if (schema is not None or schema_file) and content_types and not any(
            _is_json_type(t) for t in content_types):
        node.error("content_types", "a json_schema needs a JSON content type")
    node.done()
    return ValidationConfig(methods=methods, max_body=max_body, content_types=content_types,
                            json_schema=schema, json_schema_file=schema_file,
                            json_schema_path=schema_path)


def _is_json_type(media_type: str) -> bool:
    return media_type in ("application/json", "application/*") or media_type.endswith("+json")


def check_json_schema(schema: Any) -> list[str]:
    """Problems with a JSON Schema (empty: usable). Imports jsonschema: called only when a
    schema is configured, so a sidecar without one never loads it."""
    try:
        from jsonschema.exceptions import SchemaError
        from jsonschema.validators import validator_for
    except ImportError:
        return ["needs the jsonschema package (pip install jsonschema)"]
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        return [f"invalid JSON Schema at {where}: {exc.message}"]
    return []


def parse_audit(node: Fields) -> AuditConfig:
    """The bootstrap's ``audit``."""
    d = AuditConfig()
    config = AuditConfig(
        path=node.str("path", d.path),
        max_size=node.size("max_size", d.max_size),
        keep=node.int("keep", d.keep, min=0, max=1000),
        queue=node.int("queue", d.queue, min=1, max=10_000_000),
        warn_interval=node.duration("warn_interval", d.warn_interval),
    )
    if config.max_size < 4096:
        node.error("max_size", "must be at least 4KiB")
    node.done()
    return config


# === redaction ===========================================================================

_SECRET_NAMES = frozenset({"hash", "key", "api_key", "token", "secret", "password",
                           "authorization", "x-api-key", "proxy-authorization", "cookie"})
# A JWT (three base64url parts, header starting '{"') or a configured key hash.
_TOKENISH = re.compile(
    r"^(eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*|sha256:[0-9a-fA-F]{64})$")


def redact(obj: Any, _key: str | None = None) -> Any:
    """A JSON-able copy of ``obj`` (config dataclasses, mappings, lists) with every secret
    replaced by ``"<redacted>"``: dataclass fields marked ``secret``, mapping entries named
    like credentials (hash, key, token, authorization...) and strings that look like a JWT or
    a key hash. Used for ``/config_dump`` and logs; over-redacting is the safe mistake."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            out[f.name] = REDACTED if f.metadata.get("secret") else redact(value)
        return out
    if isinstance(obj, Mapping):
        return {str(k): (REDACTED if str(k).lower() in _SECRET_NAMES and obj[k] is not None
                         and not isinstance(obj[k], (Mapping, bool)) else redact(obj[k]))
                for k in obj}
    if isinstance(obj, (frozenset, set)):
        return sorted(redact(v) for v in obj)
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, bytes):
        return REDACTED
    if isinstance(obj, str):
        return REDACTED if _TOKENISH.match(obj) else obj
    if isinstance(obj, PurePath):
        return str(obj)
    return obj
