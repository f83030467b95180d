"""Which route answers a request. Pure: compiled once per snapshot, matched per exchange.

Outbound and gateway listeners pick the service by the request's host (the names in
``services.<name>.hosts``), then the first route of that service whose match fits.
Inbound listeners only ever serve the local service, so they match its routes directly.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config.model import MeshConfig, RouteConfig, ServiceConfig
from ..http.message import RequestHead

__all__ = ["RouteTable", "matches"]


def matches(route: RouteConfig, head: RequestHead) -> bool:
    m = route.match
    if m.path_exact is not None:
        if head.path != m.path_exact:
            return False
    elif not head.path.startswith(m.path_prefix):
        return False
    if len(m.methods) and head.method not in m.methods:  # (a set's truth: a generic call)
        return False
    for name, value in m.headers:
        if head.header(name.encode()) != value.encode():
            return False
    return True


@dataclass(frozen=True, slots=True)
class RouteTable:
    by_host: dict[str, ServiceConfig]
    services: dict[str, ServiceConfig]

    @classmethod
    def build(cls, mesh: MeshConfig) -> RouteTable:
        by_host = {host: svc for svc in mesh.services.values() for host in svc.hosts}
        return cls(by_host=by_host, services=dict(mesh.services))

    def service_for_host(self, host: str) -> ServiceConfig | None:
        return self.by_host.get(host)

    @staticmethod
    def route(service: ServiceConfig, head: RequestHead) -> RouteConfig | None:
        for route in service.routes:
            if matches(route, head):
                return route
        return None
