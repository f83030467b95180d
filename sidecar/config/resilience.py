"""Config of failure containment for a service: its retries, circuit breaker, health checks,
outlier ejection and load balancing, read together from the service's node.

Each section has its own module (``retries``, ``breaker``, ``health``, ``outlier``,
``load_balancing``; ``fault`` for the per-route fault injection), which documents its YAML shape
and defaults. This module groups a service's sections into ``ServiceResilience`` and re-exports
the sections' public names, so that ``from sidecar.config.resilience import RetryConfig`` keeps
working for the importers that want them together. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from .breaker import BREAKER_FAILURES, BreakerConfig, ErrorRateConfig, parse_breaker
from .fault import FaultAbort, FaultConfig, FaultDelay, parse_fault
from .health import HealthCheckConfig, parse_health_check
from .load_balancing import LoadBalancerConfig, check_weights, parse_load_balancer
from .outlier import OutlierConfig, parse_outlier
from .reader import Fields
from .retries import RETRY_CONDITIONS, RetryBudgetConfig, RetryConfig, parse_retries

Address = tuple[str, int]  # as in model.py, which imports this module

__all__ = [
    "BREAKER_FAILURES",
    "BreakerConfig",
    "ErrorRateConfig",
    "FaultAbort",
    "FaultConfig",
    "FaultDelay",
    "HealthCheckConfig",
    "LoadBalancerConfig",
    "OutlierConfig",
    "RETRY_CONDITIONS",
    "RetryBudgetConfig",
    "RetryConfig",
    "ServiceResilience",
    "check_weights",
    "parse_breaker",
    "parse_fault",
    "parse_health_check",
    "parse_load_balancer",
    "parse_outlier",
    "parse_retries",
    "parse_service_resilience",
]


@dataclass(frozen=True, slots=True)
class ServiceResilience:
    retries: RetryConfig = RetryConfig()
    breaker: BreakerConfig = BreakerConfig()
    health_check: HealthCheckConfig | None = None
    outlier: OutlierConfig = OutlierConfig()
    load_balancer: LoadBalancerConfig = LoadBalancerConfig()


def parse_service_resilience(node: Fields,
                             endpoints: tuple[Address, ...] = ()) -> ServiceResilience:
    """Read ``retries``, ``breaker``, ``health_check``, ``outlier`` and ``load_balancer`` from a
    service's node. Does not call ``node.done()``: the service parser owns the other keys."""
    load_balancer = parse_load_balancer(node.sub("load_balancer"))
    if endpoints:
        check_weights(load_balancer, endpoints, node.at("load_balancer"), node.problems)
    return ServiceResilience(
        retries=parse_retries(node.sub("retries")),
        breaker=parse_breaker(node.sub("breaker")),
        health_check=node.optional("health_check", parse_health_check),
        outlier=parse_outlier(node.sub("outlier")),
        load_balancer=load_balancer,
    )
