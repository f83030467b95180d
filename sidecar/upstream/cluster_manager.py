"""The clusters of each snapshot, and their state across snapshots.

``build`` makes a new snapshot's ``ClusterSet`` *beside* the live one and changes nothing
that serves: an exchange holds its snapshot, and with it the clusters that snapshot named,
until it is done. Per cluster, whatever is state rather than config carries over: the
``Pool`` of every endpoint whose address and pool settings did not change (a reload drops
no connection), endpoint health, ejections and load, the circuit breaker and the retry
budget (when their config is unchanged), and the health checker. ``activate`` (right after
the snapshot swap) starts what is new; the superseded set is retired once its last exchange
is done: its pools and health checkers that no live set shares are closed (idle connections
now, busy ones when done) and stopped. Live sets are the current one plus those that still
carry exchanges, so a swap every few seconds leaks nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
import time
from collections.abc import Callable, Iterator
from typing import Any, Final, Protocol

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

__all__ = ["ClusterManager", "ClusterSet", "LOCAL_APP", "retire_later"]

LOCAL_APP: Final = "local-app"
log = structlog.get_logger("pake.cluster")

PoolKey = tuple[str, Address, PoolConfig, bool]


class UpstreamTls(Protocol):
    """Per-endpoint mTLS for mesh clusters (``sidecar.tls.SidecarTls``): a context getter that
    may offer the endpoint's last TLS session (an SSLContext or a look-alike wrapping one), and
    ``identify(transport)`` returning the SPIFFE ID the endpoint proved."""

    def context_for(self, address: Address) -> Callable[[], Any]: ...
    def identify_for(self, address: Address) -> Callable[[object], str | None]: ...


class ClusterSet:
    """The clusters of one snapshot, by name, and the exchanges that still hold them.

    ``hold``/``release`` count exchanges (an exchange holds its snapshot from the moment its
    head is parsed until it is finished). Once superseded, the set is retired by the first
    ``release`` that leaves it idle, or at once if nothing holds it.
    """

    __slots__ = ("clusters", "pools", "in_flight", "retired", "_on_idle")

    def __init__(self, clusters: dict[str, Cluster], pools: dict[PoolKey, Pool]) -> None:
        self.clusters = clusters
        self.pools = pools
        self.in_flight = 0
        self.retired = False
        self._on_idle: Callable[[ClusterSet], None] | None = None

    def get(self, name: str) -> Cluster | None:
        return self.clusters.get(name)

    def values(self) -> Iterator[Cluster]:
        return iter(self.clusters.values())

    def hold(self) -> None:
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1
        if self.in_flight <= 0 and self._on_idle is not None:
            on_idle, self._on_idle = self._on_idle, None
            on_idle(self)

    def resources(self) -> Iterator[Pool | HealthChecker]:
        """What this set keeps open: pools, and health checkers (each once)."""
        yield from self.pools.values()
        seen: set[int] = set()
        for cluster in self.clusters.values():
            if cluster.health is not None and id(cluster.health) not in seen:
                seen.add(id(cluster.health))
                yield cluster.health


def retire_later(loop: asyncio.AbstractEventLoop, retire: Callable[[ClusterSet], None],
                 clusters: ClusterSet) -> None:
    """For a ``weakref.finalize`` on a snapshot: the snapshot is gone, so nothing can use its
    clusters any more, even if an exchange was dropped without being finished (its count
    would otherwise keep the set alive for ever). Finalizers run wherever the collector
    runs, possibly on another thread: the work is handed to the loop."""
    if not loop.is_closed():
        with contextlib.suppress(RuntimeError):  # the loop closed in between
            loop.call_soon_threadsafe(retire, clusters)


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
        self.current = ClusterSet({}, {})
        self.retiring: set[ClusterSet] = set()  # superseded sets that still carry exchanges
        self._shared: dict[Pool | HealthChecker, int] = {}  # resource -> live sets holding it
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def clusters(self) -> dict[str, Cluster]:
        """The current snapshot's clusters (admin, metrics; exchanges use their own)."""
        return self.current.clusters

    def build(self, mesh: MeshConfig, local_service: str | None, app: Address | None,
              *, mesh_tls: bool = False) -> ClusterSet:
        """The clusters of a new snapshot, built beside the live ones: nothing that serves
        changes until ``activate``."""
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
        return ClusterSet(clusters, pools)

    def activate(self, new: ClusterSet) -> None:
        """``new`` is the current snapshot's set now (the snapshot was just swapped): start what
        it added, and retire the set it replaced once that one's last exchange is done."""
        for resource in new.resources():
            self._shared[resource] = self._shared.get(resource, 0) + 1
        for cluster in new.clusters.values():
            for pool in cluster.pools.values():
                pool.breaker = cluster.breaker
            if cluster.health is not None:
                cluster.health.update_endpoints(cluster.endpoints)
                cluster.health.start()
        old, self.current = self.current, new
        if old.in_flight <= 0:
            self.retire(old)
        else:
            self.retiring.add(old)
            old._on_idle = self.retire

    def retire(self, old: ClusterSet) -> None:
        """Let go of a superseded set: close and stop what no live set shares any more.
        Idempotent (the count and the snapshot's finalizer may both get here)."""
        if old.retired or old is self.current or self._closed:
            return
        old.retired = True
        self.retiring.discard(old)
        for resource in old.resources():
            left = self._shared.get(resource, 0) - 1
            if left > 0:
                self._shared[resource] = left
                continue
            self._shared.pop(resource, None)
            if isinstance(resource, Pool):
                resource.close()
            else:
                task = self._loop.create_task(resource.stop())
                self._tasks.add(task)  # held: the loop keeps only weak references to tasks
                task.add_done_callback(self._tasks.discard)

    async def settled(self) -> None:
        """Wait until the health checkers of retired sets have stopped."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def live_pools(self) -> int:
        """Pools some live set holds (the current one, or one still carrying exchanges)."""
        return sum(1 for r in self._shared if isinstance(r, Pool))

    def live_health_checkers(self) -> int:
        return sum(1 for r in self._shared if isinstance(r, HealthChecker))

    def _cluster(self, name: str, endpoints: tuple[Address, ...], service: ServiceConfig | None,
                 pools: dict[PoolKey, Pool], *, tls: bool, trust_domain: str) -> Cluster:
        pool_config = service.pool if service else PoolConfig()
        timeouts = service.timeouts if service else ServiceTimeouts()
        res = service.resilience if service else ServiceResilience()
        old = self.current.get(name)
        source = (service, endpoints, tls, trust_domain)
        if old is not None and old.source == source:
            # Nothing of it changed: the same object, so a swap of a mostly unchanged mesh
            # (the control plane's usual push) costs a comparison per cluster.
            for address, kept in old.pools.items():
                pools[(name, address, pool_config, tls)] = kept
            return old
        states = endpoint_states(endpoints, res.load_balancer, old.endpoints if old else ())
        hostname = f"{name}.{trust_domain}" if tls else None
        if old is not None and old.resilience.breaker == res.breaker:
            breaker = old.breaker
        else:
            breaker = CircuitBreaker(res.breaker, name=name, on_transition=self._breaker_log(name))
        budget = old.retry.budget if old is not None and old.resilience.retries.budget == res.retries.budget else None
        # Unchanged rules keep their object: the outlier counters are Prometheus counters, and
        # a retry policy is not cheap to build (outcome table, its own seeded RNG).
        if old is not None and old.resilience.outlier == res.outlier:
            outlier = old.outlier
        else:
            outlier = OutlierDetector(res.outlier, on_change=self._outlier_event(name))
        if old is not None and old.resilience.retries == res.retries:
            retry = old.retry
        else:
            retry = RetryPolicy(res.retries, budget=budget)
        members: dict[Address, Pool] = {}
        for address in endpoints:
            key = (name, address, pool_config, tls)
            pool = pools.get(key) or self.current.pools.get(key)
            if pool is None:
                context, identify = self._endpoint_tls(address) if tls else ((lambda: None), None)
                pool = Pool(address, pool_config, self._loop, ssl_context=context,
                            server_hostname=hostname, identify=identify,
                            on_connect_failure=functools.partial(self._on_connect_failure, name))
            pools[key] = pool  # (its breaker is set when the set is activated)
            members[address] = pool
        health = None
        if res.health_check is not None:
            if old is not None and old.health is not None and old.health.config == res.health_check:
                health = old.health  # (probes the new endpoints once the set is activated)
            else:
                health = HealthChecker(name, res.health_check, states, on_change=self._health_log(name),
                                       ssl=self._client_tls if tls else None, server_hostname=hostname,
                                       expected_identity=f"spiffe://{trust_domain}/service/{name}" if tls else None,
                                       identify=(lambda a: self._endpoint_tls(a)[1]) if tls else None)
        return Cluster(
            name=name, endpoints=states, pools=members, timeouts=timeouts, pool_config=pool_config,
            resilience=res, load_balancer=load_balancer_for(res.load_balancer), breaker=breaker,
            outlier=outlier, retry=retry, health=health,
            earlier_route_policies=old.route_policies if old is not None else {},
            expected_identity=f"spiffe://{trust_domain}/service/{name}" if tls else None,
            max_request_body=service.max_request_body if service else None,
            source=source,
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
                self._loop.call_at(endpoint.ejected_until, self._sweep, name, endpoint)
        return change

    def _sweep(self, name: str, endpoint: EndpointState) -> None:
        cluster = self.current.get(name)
        if cluster is None:
            return
        now = time.monotonic()  # the router's clock, in which ``ejected_until`` was set
        if endpoint.ejected and endpoint.ejected_until > now:
            # early: the loop's timers count whole milliseconds, so one can fire up to half
            # of one before a time of this clock
            self._loop.call_at(endpoint.ejected_until, self._sweep, name, endpoint)
            return
        cluster.outlier.sweep(now, cluster.endpoints)


    def app_healthy(self) -> bool | None:
        """The local app's health when it is checked (``health_check`` on the local service)."""
        local = self.current.get(LOCAL_APP)
        if local is None or local.health is None:
            return None
        return all(e.healthy for e in local.endpoints)

    async def close(self) -> None:
        """Drain's end: every pool closes and every health checker stops, live or retiring."""
        self._closed = True
        resources, self._shared = list(self._shared), {}
        self.retiring.clear()
        for resource in resources:
            if isinstance(resource, Pool):
                resource.close()
        for resource in resources:
            if isinstance(resource, HealthChecker):
                await resource.stop()
        await self.settled()
