"""Config push: coalesce changes, build each service's snapshot once, hand it to every session.

A change (apply, rollback, endpoint change) marks the push dirty; the pusher waits until
changes stop for ``debounce`` seconds, but never longer than ``max_delay`` after the first,
then builds one snapshot per service (encoded once, shared by that service's sidecars) and
offers it to each session, which sends it when its own writer is free. So the push itself
never waits on any sidecar.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import structlog

from control.ca_service import CAService
from control.config import AppliedConfig, ConfigService
from control.mesh_tokens import MeshTokenKeys
from control.registry import Registry
from control.snapshots import build_subset, snapshot_version
from control.stream import SessionKey, SidecarSession
from sidecar.discovery.protocol import Snapshot, encode

__all__ = ["Pusher"]

log = structlog.get_logger("control.push")


class Pusher:
    def __init__(self, config: ConfigService, registry: Registry, ca: CAService,
                 sessions: Callable[[], Mapping[SessionKey, SidecarSession]],
                 *, debounce: float = 0.02, max_delay: float = 0.2,
                 mesh_tokens: MeshTokenKeys | None = None) -> None:
        self.config = config
        self.registry = registry
        self.ca = ca
        self._sessions = sessions
        self.debounce = debounce
        self.max_delay = max_delay
        self.mesh_tokens = mesh_tokens
        self._changed = asyncio.Event()
        self._applied: AppliedConfig | None = None
        self._cache: dict[str, tuple[str, str]] = {}
        self.pushes = 0

    async def start(self) -> None:
        self._applied = await self.config.current()

    def mark_dirty(self) -> None:
        self._changed.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._changed.wait()
            deadline = loop.time() + self.max_delay
            while True:
                self._changed.clear()
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(min(self.debounce, remaining)):
                        await self._changed.wait()
                except TimeoutError:
                    break
            await self.push_all()

    async def push_all(self) -> None:
        self._applied = await self.config.current()
        self._cache.clear()
        sessions = list(self._sessions().values())
        for session in sessions:
            built = self.snapshot_for(session.service)
            if built is not None:
                session.offer_snapshot(*built)
        self.pushes += 1
        log.info("push", version=None if self._applied is None else self._applied.version,
                 sidecars=len(sessions), services=len(self._cache))

    def snapshot_for(self, service: str) -> tuple[str, str] | None:
        """(version, encoded snapshot) for ``service``; None before any config is applied."""
        if self._applied is None:
            return None
        cached = self._cache.get(service)
        if cached is None:
            bundle = self.ca.bundle_pem()
            mesh = build_subset(self._applied.mesh, service, self.registry.endpoints(),
                                mesh_tokens=self.mesh_tokens)
            version = snapshot_version(self._applied.version, mesh, bundle)
            cached = (version, encode(Snapshot(version=version, mesh=mesh, bundle=bundle)))
            self._cache[service] = cached
        return cached

    def greet(self, session: SidecarSession) -> None:
        """A new stream gets its snapshot at once (not after the debounce); nothing is sent
        when the version it already holds is the current one."""
        built = self.snapshot_for(session.service)
        if built is not None:
            session.offer_snapshot(*built)
