"""Config push: coalesce changes, build each service's snapshot once, hand it to every session.

A change (an applied config, an endpoint, the CA's bundle: whatever the store watch reports,
whichever replica wrote it) marks the push dirty. The first change after a quiet ``debounce``
goes out at once (discovery: a new endpoint reaches its callers in milliseconds); changes that
follow within the debounce are coalesced: the pusher waits until they stop for ``debounce``
seconds, but never longer than ``max_delay`` after the first. A push builds one snapshot per
service (encoded once, shared by that service's sidecars) and offers it to each session, which sends it when its own writer is free. So the push itself
never waits on any sidecar. The applied config is the one the store watch last reported
(``set_applied``), never a read of this replica's own: every replica pushes the same.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import structlog

from control.ca_service import CAService
from control.config import AppliedConfig, ConfigService
from control.mesh_tokens import MeshTokenKeys
from control.registry import Registry
from control.snapshots import build_subset, snapshot_version
from control.stream import SessionKey, SidecarSession
from sidecar.discovery.protocol import Snapshot, encode

__all__ = ["Built", "Pusher"]

log = structlog.get_logger("pake.control.push")


@dataclass(frozen=True, slots=True)
class Built:
    """One service's snapshot, encoded once: its version, the frame, the bundle's roots."""

    version: str
    text: str
    roots: tuple[str, ...]


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
        self._cache: dict[str, Built] = {}
        # The registry's endpoints as of this push: read once, not once per service.
        self._endpoints: dict[str, list[str]] | None = None
        self.pushes = 0

    @property
    def applied(self) -> AppliedConfig | None:
        return self._applied

    def set_applied(self, applied: AppliedConfig | None) -> None:
        self._applied = applied
        self.mark_dirty()

    def mark_dirty(self) -> None:
        self._cache.clear()  # a greeting before the push must not get the old snapshot
        self._changed.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        last_push = -math.inf
        while True:
            await self._changed.wait()
            if loop.time() - last_push >= self.debounce:
                # Quiet until now: this change goes out at once (a new endpoint reaches its
                # callers without waiting out the debounce); what follows it within the
                # debounce is coalesced into the next push, as below.
                self._changed.clear()
                await self.push_all()
                last_push = loop.time()
                continue
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
            last_push = loop.time()

    async def push_all(self) -> None:
        self._cache.clear()
        self._endpoints = self.registry.endpoints()
        sessions = list(self._sessions().values())
        for session in sessions:
            built = self.snapshot_for(session.service)
            if built is not None:
                session.offer_snapshot(built)
        self._endpoints = None  # a greeting between pushes reads the registry afresh
        self.pushes += 1
        log.info("push", version=None if self._applied is None else self._applied.version,
                 sidecars=len(sessions), services=len(self._cache))

    def snapshot_for(self, service: str) -> Built | None:
        """``service``'s snapshot; None before any config is applied."""
        if self._applied is None:
            return None
        cached = self._cache.get(service)
        if cached is None:
            bundle = self.ca.bundle_pem()
            endpoints = self._endpoints if self._endpoints is not None else self.registry.endpoints()
            mesh = build_subset(self._applied.mesh, service, endpoints, mesh_tokens=self.mesh_tokens)
            version = snapshot_version(self._applied.version, mesh, bundle)
            cached = Built(version, encode(Snapshot(version=version, mesh=mesh, bundle=bundle)),
                           self.ca.root_fingerprints())
            self._cache[service] = cached
        return cached

    def greet(self, session: SidecarSession) -> None:
        """A new stream gets its snapshot at once (not after the debounce); nothing is sent
        when the version it already holds is the current one."""
        built = self.snapshot_for(session.service)
        if built is not None:
            session.offer_snapshot(built)
