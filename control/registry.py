"""The service registry: which sidecar serves which service at which inbound address.

A registration is written to the store (``registry/<service>/<node>``) when it appears or
changes (address, app health), not on every heartbeat: heartbeats only refresh an in-memory
last-seen time. An entry unheard of for ``grace`` seconds is deleted, whether its stream
closed or just went quiet; entries loaded at start-up get a full grace from then, so a
restarted control plane keeps serving the endpoints it knew while the sidecars reconnect.
``on_change`` is called (synchronously, cheap) whenever the set of endpoints changed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from control.store import Store

__all__ = ["Registration", "Registry"]

_PREFIX = "registry/"


@dataclass(frozen=True, slots=True)
class Registration:
    service: str
    node: str
    address: str | None
    app_healthy: bool
    registered_at: str

    @property
    def key(self) -> str:
        return f"{_PREFIX}{self.service}/{self.node}"


class Registry:
    def __init__(self, store: Store, grace: float, on_change: Callable[[], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.grace = grace
        self._on_change = on_change
        self._clock = clock
        self._entries: dict[str, Registration] = {}
        self._last_seen: dict[str, float] = {}

    async def load(self) -> None:
        now = self._clock()
        for entry in await self.store.list(_PREFIX):
            reg = Registration(**json.loads(entry.value))
            self._entries[reg.key] = reg
            self._last_seen[reg.key] = now

    def registrations(self) -> list[Registration]:
        return [self._entries[k] for k in sorted(self._entries)]

    def endpoints(self) -> dict[str, list[str]]:
        """Healthy, unexpired inbound addresses by service, in a stable order."""
        out: dict[str, list[str]] = {}
        for key in sorted(self._entries):
            reg = self._entries[key]
            if reg.address is not None and reg.app_healthy:
                out.setdefault(reg.service, []).append(reg.address)
        return out

    async def register(self, reg: Registration) -> None:
        """Record ``reg`` (a hello, a health change, or a heartbeat after expiry)."""
        self._last_seen[reg.key] = self._clock()
        old = self._entries.get(reg.key)
        if old is not None and (old.address, old.app_healthy) == (reg.address, reg.app_healthy):
            return
        self._entries[reg.key] = reg
        await self.store.put(reg.key, json.dumps(asdict(reg)).encode())
        self._on_change()

    def heard_from(self, service: str, node: str) -> bool:
        """Refresh last-seen; False when the entry already expired (the caller re-registers)."""
        key = f"{_PREFIX}{service}/{node}"
        if key not in self._entries:
            return False
        self._last_seen[key] = self._clock()
        return True

    def get(self, service: str, node: str) -> Registration | None:
        return self._entries.get(f"{_PREFIX}{service}/{node}")

    async def expire(self) -> list[Registration]:
        """Delete every entry unheard of for longer than grace; returns them."""
        now = self._clock()
        gone = [self._entries[k] for k, seen in list(self._last_seen.items())
                if now - seen > self.grace and k in self._entries]
        for reg in gone:
            del self._entries[reg.key]
            del self._last_seen[reg.key]
            await self.store.delete(reg.key)
        if gone:
            self._on_change()
        return gone
