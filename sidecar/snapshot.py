"""The sidecar's config at one moment, compiled for the request path.

A snapshot is built whole from a validated ``MeshConfig`` and swapped in with one
assignment; an exchange keeps the snapshot it started with, clusters included: everything
a request reads after its head is parsed (routes, filters, clusters) hangs off the one
object it holds. Building it is where route tables and filter chains are compiled, so the
per-request work is look-ups only. ``compile_snapshot`` does no I/O on the event loop's
behalf and touches nothing live: it may run in a worker thread (it reads schema files).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .config.model import Bootstrap, MeshConfig, ServiceConfig, WeightedTarget
from .filters.base import BodyFilter, FilterChain
from .routing.route_table import RouteTable
from .routing.split import WeightedChooser
from .upstream.cluster_manager import ClusterSet

__all__ = ["Snapshot", "build_snapshot", "compile_snapshot"]


@dataclass(frozen=True, slots=True, weakref_slot=True)
class Snapshot:
    version: str
    mesh: MeshConfig
    routes: RouteTable
    local_service: ServiceConfig | None
    filters: dict[str, FilterChain] = field(default_factory=dict)  # by listener name
    # The weighted split of each route with several targets, by ``id(route)``.
    choosers: dict[int, WeightedChooser[WeightedTarget]] = field(default_factory=dict)
    # By listener name: the filter of the listener that may need a request's whole body.
    body_filters: dict[str, BodyFilter] = field(default_factory=dict)
    # The clusters this snapshot routes to; counts the exchanges holding it (see ClusterSet).
    clusters: ClusterSet = field(default_factory=lambda: ClusterSet({}, {}))
    # No methods: this class is not compiled, and the compiled request path reads the dicts
    # itself (a call into an interpreted method costs ~1.5k instructions, a dict get ~150).


def build_snapshot(bootstrap: Bootstrap, mesh: MeshConfig,
                   filters: dict[str, FilterChain] | None = None,
                   clusters: ClusterSet | None = None) -> Snapshot:
    """A whole snapshot; see ``compile_snapshot`` for the part that may run off the loop."""
    snapshot = compile_snapshot(bootstrap, mesh, filters)
    return snapshot if clusters is None else replace(snapshot, clusters=clusters)


def compile_snapshot(bootstrap: Bootstrap, mesh: MeshConfig,
                     filters: dict[str, FilterChain] | None = None) -> Snapshot:
    """Routes, weighted splits and filters, without clusters (``replace(.., clusters=..)``
    adds them on the loop, just before the swap)."""
    choosers = {id(route): WeightedChooser.of_targets(route.to)
                for service in mesh.services.values() for route in service.routes if len(route.to) > 1}
    filters = filters or {}
    body_filters = {listener: f for listener, chain in filters.items() for f in chain
                    if isinstance(f, BodyFilter)}
    return Snapshot(
        version=mesh.version,
        choosers=choosers,
        body_filters=body_filters,
        mesh=mesh,
        routes=RouteTable.build(mesh),
        local_service=mesh.services.get(bootstrap.service),
        filters=filters,
    )
