"""Which filters run on which listener, built once per snapshot.

- ``gateway``: the edge for outside callers: sanitize (claim headers, the mesh token) ->
  JWT -> API key -> RBAC (the gateway service's own policy) -> rate limit -> validation ->
  mesh token mint (when the snapshot holds the signing key) -> router.
- ``inbound``: calls from other sidecars (the mTLS peer is already known): sanitize ->
  JWT / API key when the local service has ``authn`` -> mesh token verify (when the mesh has
  ``mesh_tokens``) -> RBAC (its ``policy``) -> rate limit -> validation -> router to the
  local app.
- ``outbound``: the local app's own calls: no filters; the callee's sidecar decides.

Order matters: authentication sets the principal that RBAC reads, and exactly one authn
filter decides an exchange (the JWT filter leaves a missing token to the API-key filter
when both are accepted). Filters of a previous snapshot whose config did not change keep
their state (rate-limit buckets, verified-token caches) through ``previous``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from typing import TYPE_CHECKING

from ..audit import AuditLog
from ..clock import Clock
from ..config.model import Bootstrap, MeshConfig, ServiceConfig
from ..errors import LocalReply
from ..exchange import Exchange
from .base import Filter, FilterChain

if TYPE_CHECKING:
    from ..jwt.jwks import JwksCache

# Each filter module is imported only when a service configures it: PyJWT and cryptography
# alone add about 9 MB to a sidecar's memory, and there is one sidecar per service.

__all__ = ["build_chains", "run_filters"]


def run_filters(chain: FilterChain, exchange: Exchange) -> LocalReply | None:
    """Each filter in turn until one answers. Here, not in ``base`` (which stays Python for
    its runtime-checkable protocols), so that the loop runs compiled on every exchange."""
    for f in chain:
        reply = f.on_request(exchange)
        if reply is not None:
            exchange.tag_once("filter", f.name)
            return reply
    return None


def build_chains(bootstrap: Bootstrap, mesh: MeshConfig, *, caches: Mapping[str, JwksCache],
                 audit: AuditLog | None, clock: Clock,
                 previous: Mapping[str, FilterChain] | None = None) -> dict[str, FilterChain]:
    local = mesh.services.get(bootstrap.service)
    chains: dict[str, FilterChain] = {}
    for listener in bootstrap.listeners:
        if listener.name in ("inbound", "gateway") and local is not None:
            old = (previous or {}).get(listener.name, ())
            chains[listener.name] = _service_chain(local, mesh, caches=caches, audit=audit,
                                                   clock=clock, base_dir=bootstrap.mesh_path.parent,
                                                   previous=old, listener=listener.name)
    return chains


def _service_chain(service: ServiceConfig, mesh: MeshConfig, *, caches: Mapping[str, JwksCache],
                   audit: AuditLog | None, clock: Clock, base_dir: Path,
                   previous: FilterChain, listener: str = "inbound") -> FilterChain:
    chain: list[Filter] = []
    tokens = mesh.mesh_tokens
    edge = listener == "gateway"
    if tokens is not None and edge:
        from .mesh_token import MeshTokenStrip
        chain.append(MeshTokenStrip(tokens.header_bytes))
    providers = mesh.policy.jwt_providers.values()
    if any(p.claims_to_headers for p in providers):
        # claim headers any provider may set are stripped everywhere, so an app can trust them
        # (the reserved x-pake-* ones the request parser already drops in its single pass)
        from .claims_headers import build_header_sanitizer
        chain.append(build_header_sanitizer(providers))
    authn = service.authn
    if authn is not None and authn.jwt:
        from .authn_jwt import build_jwt_authn
        chain.append(build_jwt_authn(authn, mesh.policy.jwt_providers, caches, audit=audit))
    if authn is not None and authn.api_keys:
        from .authn_api_key import build_api_key_authn
        chain.append(build_api_key_authn(authn, mesh.policy.api_keys, audit=audit))
    if tokens is not None and not edge:
        from .mesh_token import MeshTokenVerify, build_mesh_token_verify
        verify = next((f for f in previous if isinstance(f, MeshTokenVerify)
                       and f.config == tokens), None)  # keeps its verified-token cache
        chain.append(verify or build_mesh_token_verify(tokens, clock=clock, audit=audit))
    if service.policy is not None:
        from .authz_rbac import build_rbac
        chain.append(build_rbac(service.policy, service=service.name,
                                trust_domain=mesh.trust_domain, audit=audit, clock=clock))
    limits = {r.name: r.rate_limit for r in service.routes if r.rate_limit is not None}
    if limits:
        from .rate_limit import RateLimitFilter, build_rate_limit
        old = next((f for f in previous if isinstance(f, RateLimitFilter)), None)
        chain.append(build_rate_limit(limits, clock=clock, previous=old))
    validations = {r.name: r.validation for r in service.routes if r.validation is not None}
    if validations:
        from .validation import build_validation
        chain.append(build_validation(validations, base_dir=base_dir))
    if tokens is not None and edge and tokens.signing_key is not None:
        from .mesh_token import MeshTokenMint, build_mesh_token_mint
        mint = next((f for f in previous if isinstance(f, MeshTokenMint)
                     and f.config == tokens), None)  # keeps its minted-token cache
        chain.append(mint or build_mesh_token_mint(tokens))
    return tuple(chain)
