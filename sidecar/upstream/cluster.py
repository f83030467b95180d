"""A cluster: the endpoints of one upstream service, their pools, and the pick among them."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config.model import Address, PoolConfig, ServiceTimeouts
from ..errors import NoHealthyUpstream
from .pool import Pool

__all__ = ["Cluster"]


@dataclass(slots=True)
class Cluster:
    name: str
    pools: list[Pool]
    timeouts: ServiceTimeouts
    pool_config: PoolConfig
    expected_identity: str | None = None  # the SPIFFE ID the upstream must present (mTLS)
    _next: int = field(default=0)

    def pick(self, exclude: frozenset[Address] | set[Address] = frozenset()) -> Pool:
        """Round robin, preferring endpoints not in ``exclude`` (already tried)."""
        pools = self.pools
        n = len(pools)
        if n == 0:
            raise NoHealthyUpstream(f"cluster {self.name} has no endpoints")
        for _ in range(n):
            pool = pools[self._next % n]
            self._next += 1
            if pool.address not in exclude:
                return pool
        pool = pools[self._next % n]
        self._next += 1
        return pool

    def snapshot(self) -> dict[str, object]:
        return {
            "name": self.name,
            "endpoints": [
                {"address": p.address_text, "connections": p.connections, "idle": len(p.idle),
                 "pending": len(p.waiters), "active_requests": p.active_requests}
                for p in self.pools
            ],
        }
