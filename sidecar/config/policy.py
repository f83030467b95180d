"""Who may call what: the config of authentication, RBAC, rate limits, validation and audit.

This module holds the overview and what ties the subjects together: the mesh-level
sections (``MeshPolicy``) and a service's ``authn``. Each subject has its own module:
``jwt_providers``, ``api_keys``, ``rbac``, ``rate_limit``, ``validation``, ``audit``; and
``redact`` keeps secrets out of config dumps. All are frozen slotted dataclasses read with
``Fields`` (every problem names its path; unknown keys are errors). Pure: no I/O.
Rule: a secret never appears in an error or a dump.

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
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .api_keys import ApiKey, parse_api_keys
from .jwt_providers import JwtProvider, parse_jwt_providers
from .reader import Fields, strings_of

__all__ = ["MeshPolicy", "ServiceAuthn", "parse_authn", "parse_mesh_policy"]


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


def parse_mesh_policy(top: Fields) -> MeshPolicy:
    """Reads the top-level ``jwt_providers`` and ``api_keys`` of the mesh config."""
    return MeshPolicy(jwt_providers=parse_jwt_providers(top), api_keys=parse_api_keys(top))


def parse_authn(node: Fields, mesh: MeshPolicy | None = None) -> ServiceAuthn:
    """``services.<name>.authn``; with ``mesh``, names are checked against its sections."""
    jwt = strings_of(node, "jwt")
    api_keys = strings_of(node, "api_keys")
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
