"""All clusters of the current snapshot, and their state across snapshots.

A snapshot swap builds new ``Cluster`` objects but keeps, per cluster, whatever is state
rather than config: the ``Pool`` of every endpoint whose address and pool settings did not
change (a reload drops no connection), endpoint health, ejections and load, the circuit
breaker and the retry budget (when their config is unchanged), and the health checker.
Pools of endpoints that left are closed gently: idle connections now, busy ones when done.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from ..config.model import Address, MeshConfig, PoolConfig, ServiceConfig, ServiceTimeouts
from ..config.resilience import ServiceResilience
from .circuit_breaker import BreakerState, CircuitBreaker
from .cluster import Cluster
from .endpoint import EndpointState
from .health_check import HealthChecker
from .load_balancer import endpoint_states, load_balancer_for
from .outlier import OutlierDetector
from .pool import Pool
from .retry import RetryPolicy

__all__ = ["ClusterManager", "LOCAL_APP"]

LOCAL_APP = "local-app"
log = structlog.get_logger("pake.cluster")

PoolKey = tuple[str, Address, PoolConfig, bool]


class UpstreamTls(Protocol):
    """Per-endpoint mTLS for mesh clusters (``sidecar.tls.SidecarTls``): a context getter that
    may offer the endpoint's last TLS session (an SSLContext or a look-alike wrapping one), and
    ``identify(transport)`` returning the SPIFFE ID the endpoint proved."""

    def context_for(self, address: Address) -> Callable[[], Any]: ...
    def identify_for(self, address: Address) -> Callable[[object], str | None]: ...


class ClusterManager:
    def __init__(self, loop: asyncio.AbstractEventLoop, *,
                 on_connect_failure: Callable[[str], None] = lambda cluster: None,
                 client_tls: Callable[[], ssl.SSLContext | None] = lambda: None,
                 identify: Callable[[object], str | None] | None = None,
                 tls: UpstreamTls | None = None) -> None:
        self._loop = loop
        self._on_connect_failure = on_connect_failure
        self._client_tls = client_tls
        self._identify = identify
        self._tls = tls  # when set, per endpoint instead of client_tls/identify (resumption)
        self.clusters: dict[str, Cluster] = {}
        self._pools: dict[PoolKey, Pool] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._read_buffer = bytearray(256 * 1024)  # shared by every upstream connection
        self.local_service: str | None = None

    def update(self, mesh: MeshConfig, local_service: str | None, app: Address | None,
               *, mesh_tls: bool = False) -> None:
        self.local_service = local_service
        clusters: dict[str, Cluster] = {}
        pools: dict[PoolKey, Pool] = {}
        for service in mesh.services.values():
            clusters[service.name] = self._cluster(service.name, service.endpoints, service, pools,
                                                   tls=mesh_tls and service.tls,
                                                   trust_domain=mesh.trust_domain)
        if app is not None:
            local = mesh.services.get(local_service or "")
            clusters[LOCAL_APP] = self._cluster(LOCAL_APP, (app,), local, pools, tls=False,
                                                trust_domain=mesh.trust_domain)
        for key, pool in self._pools.items():
            if key not in pools:
                pool.close()
        for name, old in self.clusters.items():
            new = clusters.get(name)
            if old.health is not None and (new is None or new.health is not old.health):
                task = self._loop.create_task(old.health.stop())
                self._tasks.add(task)  # held: the loop keeps only weak references to tasks
                task.add_done_callback(self._tasks.discard)
        self._pools = pools
        self.clusters = clusters
        for cluster in clusters.values():
            if cluster.health is not None:
                cluster.health.start()

    def _cluster(self, name: str, endpoints: tuple[Address, ...], service: ServiceConfig | None,
                 pools: dict[PoolKey, Pool], *, tls: bool, trust_domain: str) -> Cluster:
        pool_config = service.pool if service else PoolConfig()
        timeouts = service.timeouts if service else ServiceTimeouts()
        res = service.resilience if service else ServiceResilience()
        old = self.clusters.get(name)
        states = endpoint_states(endpoints, res.load_balancer, old.endpoints if old else ())
        hostname = f"{name}.{trust_domain}" if tls else None
        if old is not None and old.resilience.breaker == res.breaker:
            breaker = old.breaker
        else:
            breaker = CircuitBreaker(res.breaker, name=name, on_transition=self._breaker_log(name))
        budget = old.retry.budget if old is not None and old.resilience.retries.budget == res.retries.budget else None
        members: dict[Address, Pool] = {}
        for address in endpoints:
            key = (name, address, pool_config, tls)
            pool = pools.get(key) or self._pools.get(key)
            if pool is None:
                context, identify = self._endpoint_tls(address) if tls else ((lambda: None), None)
                pool = Pool(address, pool_config, self._loop, ssl_context=context,
                            server_hostname=hostname, identify=identify,
                            on_connect_failure=lambda n=name: self._on_connect_failure(n),
                            read_buffer=self._read_buffer)
            pool.breaker = breaker
            pools[key] = pool
            members[address] = pool
        health = None
        if res.health_check is not None:
            if old is not None and old.health is not None and old.health.config == res.health_check:
                health = old.health
                health.update_endpoints(states)
            else:
                health = HealthChecker(name, res.health_check, states, on_change=self._health_log(name),
                                       ssl=self._client_tls if tls else None, server_hostname=hostname,
                                       expected_identity=f"spiffe://{trust_domain}/service/{name}" if tls else None,
                                       identify=(lambda a: self._endpoint_tls(a)[1]) if tls else None)
        return Cluster(
            name=name, endpoints=states, pools=members, timeouts=timeouts, pool_config=pool_config,
            resilience=res, load_balancer=load_balancer_for(res.load_balancer), breaker=breaker,
            outlier=OutlierDetector(res.outlier, on_change=self._outlier_event(name)),
            retry=RetryPolicy(res.retries, budget=budget), health=health,
            earlier_route_policies=old.route_policies if old is not None else {},
            expected_identity=f"spiffe://{trust_domain}/service/{name}" if tls else None,
            max_request_body=service.max_request_body if service else None,
        )

    def _endpoint_tls(self, address: Address) -> tuple[Callable[[], Any], Callable[[object], str | None] | None]:
        if self._tls is not None:
            return self._tls.context_for(address), self._tls.identify_for(address)
        return self._client_tls, self._identify

    # === events, logged where an operator looks ==============================================
    @staticmethod
    def _breaker_log(name: str) -> Callable[[BreakerState, BreakerState, str], None]:
        def transition(old: BreakerState, new: BreakerState, reason: str) -> None:
            log.warning("breaker_transition", cluster=name, old=old.name, new=new.name, reason=reason)
        return transition

    @staticmethod
    def _health_log(name: str) -> Callable[[EndpointState, bool], None]:
        def change(endpoint: EndpointState, healthy: bool) -> None:
            log.warning("endpoint_health", cluster=name, endpoint=endpoint.address_text,
                        healthy=healthy)
        return change

    def _outlier_event(self, name: str) -> Callable[[EndpointState, bool, str], None]:
        def change(endpoint: EndpointState, ejected: bool, reason: str) -> None:
            log.warning("endpoint_ejected" if ejected else "endpoint_returned", cluster=name,
                        endpoint=endpoint.address_text, reason=reason, ejections=endpoint.ejections)
            if ejected:
                # the load balancer skips it by time alone; the sweep then reports its return
                self._loop.call_at(endpoint.ejected_until, self._sweep, name)
        return change

    def _sweep(self, name: str) -> None:
        cluster = self.clusters.get(name)
        if cluster is not None:
            cluster.outlier.sweep(self._loop.time(), cluster.endpoints)

    def get(self, name: str) -> Cluster | None:
        return self.clusters.get(name)

    def app_healthy(self) -> bool | None:
        """The local app's health when it is checked (``health_check`` on the local service)."""
        local = self.clusters.get(LOCAL_APP)
        if local is None or local.health is None:
            return None
        return all(e.healthy for e in local.endpoints)

    async def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        for cluster in self.clusters.values():
            if cluster.health is not None:
                await cluster.health.stop()
