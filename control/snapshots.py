"""What one sidecar gets: the subset of the applied mesh its service needs, endpoints merged.

Pure: dicts in, dicts out, no I/O. Rules:
- a sidecar gets the top-level definitions (trust domain, JWT providers, API keys), its own
  service whole, and the services it calls with their routing and resilience but without
  their ``policy``/``authn`` (those are enforced by the callee's own sidecar);
- "the services it calls" are the route targets reachable from its own routes; when that is
  unclear (its service is not in the mesh, or its routes only lead to itself: its app may call
  anything by Host) it gets every service;
- registry endpoints are appended to ``services.X.endpoints`` of services the mesh defines;
  static endpoints stay (they reach things outside the mesh);
- the version names the applied config version and a digest of exactly what is sent, so a
  sidecar already holding it (e.g. after a control-plane restart) needs nothing new;
- a ``mesh_tokens`` section gets its keys from ``control/mesh_tokens.py`` (the signing key
  only in the snapshots of the services it names as gateways).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from control.mesh_tokens import MeshTokenKeys

__all__ = ["build_subset", "needed_services", "same_content", "snapshot_version"]

_CALLEE_ONLY = ("policy", "authn")


def _targets(service: Mapping[str, Any]) -> set[str]:
    out: set[str] = set()
    for route in service.get("routes") or ():
        if isinstance(route, Mapping):
            for target in route.get("to") or ():
                if isinstance(target, Mapping) and isinstance(target.get("service"), str):
                    out.add(target["service"])
    return out


def needed_services(mesh: Mapping[str, Any], service: str) -> set[str] | None:
    """The services ``service``'s sidecar needs, or None for all of them."""
    services: Mapping[str, Any] = mesh.get("services") or {}
    own = services.get(service)
    if not isinstance(own, Mapping) or not (_targets(own) - {service}):
        return None
    needed = {service}
    todo = [service]
    while todo:
        node = services.get(todo.pop())
        if not isinstance(node, Mapping):
            continue
        for target in _targets(node) - needed:
            needed.add(target)
            todo.append(target)
    return needed


def build_subset(mesh: Mapping[str, Any], service: str,
                 endpoints: Mapping[str, Sequence[str]], *,
                 mesh_tokens: MeshTokenKeys | None = None) -> dict[str, Any]:
    """The mesh dict for ``service``'s sidecar (a valid input of parse_mesh)."""
    out = {k: v for k, v in mesh.items() if k != "services"}
    services: Mapping[str, Any] = mesh.get("services") or {}
    needed = needed_services(mesh, service)
    subset: dict[str, Any] = {}
    for name in sorted(services):
        if needed is not None and name not in needed:
            continue
        body = dict(services[name] or {})
        if name != service:
            for key in _CALLEE_ONLY:
                body.pop(key, None)
        registered = endpoints.get(name, ())
        if registered:
            static = list(body.get("endpoints") or [])
            body["endpoints"] = static + [a for a in registered if a not in static]
        subset[name] = body
    out["services"] = subset
    return out if mesh_tokens is None else mesh_tokens.inject(out, service)


def snapshot_version(config_version: int, subset: Mapping[str, Any], bundle: str) -> str:
    """``<config version>.<digest>``: changes when anything the sidecar receives changes."""
    digest = hashlib.sha256(json.dumps(subset, sort_keys=True, default=str).encode())
    digest.update(bundle.encode())
    return f"{config_version}.{digest.hexdigest()[:12]}"


def same_content(a: str, b: str) -> bool:
    """True when two snapshot versions carry the same content (their digests agree)."""
    return a.partition(".")[2] == b.partition(".")[2] != ""
