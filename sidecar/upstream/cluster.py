"""A cluster: the endpoints of one upstream service and everything that keeps failures in:
endpoint health and ejection, the load balancer, the circuit breaker, the outlier detector
and the retry policy, plus one connection pool per endpoint.

All of this is runtime state that must survive a config reload (a breaker that forgets it
was open, or a budget that resets, would let a reload start a retry storm), so the
``ClusterManager`` carries a cluster's pieces over to the next snapshot when their config
did not change.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config.model import Address, PoolConfig, RouteConfig, ServiceTimeouts
from ..config.resilience import ServiceResilience
from .circuit_breaker import CircuitBreaker
from .endpoint import EndpointState
from .health_check import HealthChecker
from .load_balancer import LoadBalancer
from .outlier import OutlierDetector
from .pool import Pool
from .retry import RetryPolicy

__all__ = ["Cluster"]


@dataclass(slots=True, eq=False)
class Cluster:
    name: str
    endpoints: list[EndpointState]
    pools: dict[Address, Pool]
    timeouts: ServiceTimeouts
    pool_config: PoolConfig
    resilience: ServiceResilience
    load_balancer: LoadBalancer
    breaker: CircuitBreaker
    outlier: OutlierDetector
    retry: RetryPolicy
    health: HealthChecker | None = None
    expected_identity: str | None = None  # the SPIFFE ID the upstream must present (mTLS)
    max_request_body: int | None = None  # the service's own body bound (local app: the local service's)
    source: object = None  # the config it was built from: equal config, same cluster next snapshot

    def retry_policy(self, route: RouteConfig | None) -> RetryPolicy:
        """The route's own retry rules when it has them, sharing this cluster's budget."""
        if route is None or route.retries is None:
            return self.retry
        return RetryPolicy(route.retries, budget=self.retry.budget)

    def snapshot(self, now: float) -> dict[str, object]:
        health = {r["address"]: r for r in self.health.snapshot()} if self.health else {}
        endpoints = []
        for state in self.endpoints:
            pool = self.pools[state.address]
            item = state.snapshot(now)
            item.update(connections=pool.connections, idle=len(pool.idle), pending=len(pool.waiters))
            if state.address_text in health:
                item["health_check"] = health[state.address_text]
            endpoints.append(item)
        return {
            "name": self.name,
            "identity": self.expected_identity,
            "load_balancer": self.resilience.load_balancer.policy,
            "breaker": self.breaker.snapshot(now),
            "retry_budget": self.retry.budget.snapshot(now),
            "outlier": {"ejections": self.outlier.ejections, "overflows": self.outlier.overflows},
            "endpoints": endpoints,
        }
