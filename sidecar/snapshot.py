"""The sidecar's config at one moment, compiled for the request path.

A snapshot is built whole from a validated ``MeshConfig`` and swapped in with one
assignment; an exchange keeps the snapshot it started with. Building it is where route
tables and filter chains are compiled, so the per-request work is look-ups only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config.model import Bootstrap, MeshConfig, RouteConfig, ServiceConfig, WeightedTarget
from .filters.base import BodyFilter, FilterChain
from .routing.route_table import RouteTable
from .routing.split import WeightedChooser

__all__ = ["Snapshot", "build_snapshot"]


@dataclass(frozen=True, slots=True)
class Snapshot:
    version: str
    mesh: MeshConfig
    routes: RouteTable
    local_service: ServiceConfig | None
    filters: dict[str, FilterChain] = field(default_factory=dict)  # by listener name
    choosers: dict[int, WeightedChooser[WeightedTarget]] = field(default_factory=dict)  # id(route)
    body_filters: dict[str, BodyFilter] = field(default_factory=dict)  # by listener name

    def body_filter(self, listener: str) -> BodyFilter | None:
        """The filter of this listener that may need a request's whole body, if any."""
        return self.body_filters.get(listener)

    def chooser(self, route: RouteConfig) -> WeightedChooser[WeightedTarget]:
        """The weighted split of a route with several targets, compiled once per snapshot."""
        return self.choosers[id(route)]


def build_snapshot(bootstrap: Bootstrap, mesh: MeshConfig,
                   filters: dict[str, FilterChain] | None = None) -> Snapshot:
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
