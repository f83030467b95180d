"""A cluster: the endpoints of one upstream service and everything that keeps failures in:
endpoint health and ejection, the load balancer, the circuit breaker, the outlier detector
and the retry policy, plus one connection pool per endpoint.

All of this is runtime state that must survive a config reload (a breaker that forgets it
was open, or a budget that resets, would let a reload start a retry storm), so the
``ClusterManager`` carries a cluster's pieces over to the next snapshot when their config
did not change.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ..config.model import Address, PoolConfig, RouteConfig, ServiceConfig, ServiceTimeouts
from ..config.retries import RetryConfig
from ..config.resilience import ServiceResilience
from .circuit_breaker import CircuitBreaker
from .endpoint import EndpointState
from .health_check import HealthChecker
from .load_balancer import LoadBalancer
from .outlier import OutlierDetector
from .pool import Pool
from .retry import RetryPolicy

__all__ = ["Cluster", "ClusterSource"]

# What a cluster was built from (service config, endpoints, mTLS on, trust domain): equal
# next snapshot, the same cluster is kept.
ClusterSource = tuple[ServiceConfig | None, tuple[Address, ...], bool, str]


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
    source: ClusterSource | None = None

    # Routes' own retry policies by route name, made on first use. The previous snapshot's are
    # looked at once, so a route's budget state outlives a reload that did not change it.
    route_policies: dict[str, RetryPolicy] = field(default_factory=dict)
    earlier_route_policies: Mapping[str, RetryPolicy] = field(default_factory=dict)
    # Each endpoint's pool, by the endpoint itself (hashed by identity): the router's look-up
    # for every try, where ``pools`` hashes an address tuple (~490 instructions, callgrind).
    pool_of: dict[EndpointState, Pool] = field(init=False)

    def __post_init__(self) -> None:
        self.pool_of = {state: self.pools[state.address] for state in self.endpoints}

    def retry_policy(self, route: RouteConfig | None) -> RetryPolicy:
        """The route's own retry rules when it has them, else the service's."""
        if route is None or route.retries is None:
            return self.retry
        policy = self.route_policies.get(route.name)
        if policy is None or policy.config is not route.retries:
            policy = self.route_policies[route.name] = self._route_policy(route.name, route.retries)
        return policy

    def _route_policy(self, name: str, config: RetryConfig) -> RetryPolicy:
        """A route that sets ``budget`` gets budget state of its own (kept while that config is
        unchanged); one that does not shares the service's."""
        if config.budget is None:
            return RetryPolicy(config, budget=self.retry.budget)
        for known in (self.route_policies.get(name), self.earlier_route_policies.get(name)):
            if known is not None and known.budget.config == config.budget:
                return RetryPolicy(config, budget=known.budget)
        return RetryPolicy(config)

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
            "route_retry_budgets": {name: p.budget.snapshot(now)
                                    for name, p in self.route_policies.items()
                                    if p.budget is not self.retry.budget},
            "outlier": {"ejections": self.outlier.ejections, "overflows": self.outlier.overflows},
            "endpoints": endpoints,
        }
