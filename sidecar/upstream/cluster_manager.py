"""All clusters of the current snapshot, and their connection pools across snapshots.

A snapshot swap builds new ``Cluster`` objects but keeps the ``Pool`` of every endpoint whose
address and pool settings did not change, so a config reload drops no connection. Pools
of endpoints that left are closed gently: idle connections now, busy ones when done.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

from ..config.model import Address, MeshConfig, PoolConfig, ServiceConfig, ServiceTimeouts
from .cluster import Cluster
from .pool import Pool

__all__ = ["ClusterManager", "LOCAL_APP"]

LOCAL_APP = "local-app"


class ClusterManager:
    def __init__(self, loop: asyncio.AbstractEventLoop, *,
                 on_connect_failure: Callable[[str], None] = lambda cluster: None,
                 client_tls: Callable[[], ssl.SSLContext | None] = lambda: None) -> None:
        self._loop = loop
        self._on_connect_failure = on_connect_failure
        self._client_tls = client_tls
        self.clusters: dict[str, Cluster] = {}
        self._pools: dict[tuple[str, Address, PoolConfig, bool], Pool] = {}

    def update(self, mesh: MeshConfig, local_service: str | None, app: Address | None,
               *, mesh_tls: bool = False) -> None:
        clusters: dict[str, Cluster] = {}
        pools: dict[tuple[str, Address, PoolConfig, bool], Pool] = {}
        for service in mesh.services.values():
            clusters[service.name] = self._cluster(service.name, service.endpoints, service,
                                                   pools, tls=mesh_tls, trust_domain=mesh.trust_domain)
        if app is not None:
            local = mesh.services.get(local_service or "")
            clusters[LOCAL_APP] = self._cluster(LOCAL_APP, (app,), local, pools, tls=False,
                                                trust_domain=mesh.trust_domain)
        for key, pool in self._pools.items():
            if key not in pools:
                pool.close()
        self._pools = pools
        self.clusters = clusters

    def _cluster(self, name: str, endpoints: tuple[Address, ...], service: ServiceConfig | None,
                 pools: dict[tuple[str, Address, PoolConfig, bool], Pool], *, tls: bool,
                 trust_domain: str) -> Cluster:
        pool_config = service.pool if service else PoolConfig()
        timeouts = service.timeouts if service else ServiceTimeouts()
        members = []
        for address in endpoints:
            key = (name, address, pool_config, tls)
            pool = pools.get(key) or self._pools.get(key)
            if pool is None:
                pool = Pool(address, pool_config, self._loop,
                            ssl_context=self._client_tls if tls else (lambda: None),
                            on_connect_failure=lambda n=name: self._on_connect_failure(n))
            pools[key] = pool
            members.append(pool)
        identity = f"spiffe://{trust_domain}/service/{name}" if tls else None
        return Cluster(name=name, pools=members, timeouts=timeouts, pool_config=pool_config,
                       expected_identity=identity)

    def get(self, name: str) -> Cluster | None:
        return self.clusters.get(name)

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
