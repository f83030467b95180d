"""Config of load balancing: the policy, endpoint weights and the panic threshold.

Frozen slotted dataclasses and ``parse_*(node: Fields)``: bad values are reported with their
full path, unknown keys through ``Fields``. Defaults live here and nowhere else. Pure: no I/O.
The YAML shape; the values shown are the defaults, except where a comment says optional or e.g.::

    services:
      orders:
        load_balancer:
          policy: round_robin          # round_robin (smooth weighted) | least_request (P2C)
          weights: {"10.0.0.5:15006": 3}   # e.g.; endpoint address -> 1..1000; unlisted: 1
          panic_threshold: 50%         # fewer available than this: use all endpoints (0%: never)
"""

from __future__ import annotations

from dataclasses import dataclass

from .reader import Fields, Problems, parse_address

__all__ = ["LoadBalancerConfig", "check_weights", "parse_load_balancer"]

Address = tuple[str, int]  # as in model.py, which imports this package's sections


@dataclass(frozen=True, slots=True)
class LoadBalancerConfig:
    policy: str = "round_robin"  # "round_robin" | "least_request"
    weights: tuple[tuple[Address, int], ...] = ()  # endpoints not listed weigh 1
    panic_threshold: float = 0.5

    def weight_of(self, address: Address) -> int:
        for a, w in self.weights:
            if a == address:
                return w
        return 1


def parse_load_balancer(node: Fields) -> LoadBalancerConfig:
    d = LoadBalancerConfig()
    policy = node.str("policy", d.policy, choices=("round_robin", "least_request"))
    weights: list[tuple[Address, int]] = []
    wnode = node.sub("weights")
    for key in list(wnode.data):
        name = str(key)
        try:
            address = parse_address(key)
        except ValueError as exc:
            wnode.raw(key)
            wnode.error(name, str(exc))
            continue
        weight = wnode.int(key, None, min=1, max=1000)
        if weight is not None:
            weights.append((address, weight))
    wnode.done()
    config = LoadBalancerConfig(
        policy=policy,
        weights=tuple(weights),
        panic_threshold=node.percent("panic_threshold", d.panic_threshold),
    )
    node.done()
    return config


def check_weights(config: LoadBalancerConfig, endpoints: tuple[Address, ...], path: str,
                  problems: Problems) -> None:
    """A weight for an address that is not an endpoint is a typo: report it (``path`` is the
    ``load_balancer`` node's). Called by the service parser once both are read."""
    known = set(endpoints)
    for address, _ in config.weights:
        if address not in known:
            host, port = address
            problems.add(f"{path}.weights", f"{host}:{port} is not an endpoint of this service")
