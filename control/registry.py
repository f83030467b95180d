"""The service registry: which sidecar serves which service at which inbound address.

Two halves. The *view* is the whole mesh's registrations as the store holds them, kept by
the store watch (``on_store``), so every replica sees every replica's sidecars at once.
The *owned* part is the registrations this replica wrote for its own streams: it writes one
when a sidecar appears or changes (address, app health, the roots it trusts, the root its
certificate chains to), not on every heartbeat (those only refresh an in-memory last-seen
time), and deletes it when unheard of for ``grace`` seconds (with ``expect``: if another
replica re-wrote it meanwhile, the sidecar moved there and the entry is no longer ours).

``ephemeral`` (several replicas, etcd): registrations live under the replica's lease, so a
dead replica's sidecars' entries expire with its lease; entries found at start-up belong to
other (or dead) replicas and are left to their leases. Not ephemeral (one process, directory
store): entries found at start-up are adopted with a full grace from then, so a restarted
control plane keeps serving the endpoints it knew while the sidecars reconnect.
``on_change`` is called (synchronously, cheap) whenever the view changed.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

import structlog

from control.store import Conflict, Entry, Store

__all__ = ["PREFIX", "Registration", "Registry"]

log = structlog.get_logger("pake.control.registry")

PREFIX = "registry/"


@dataclass(frozen=True, slots=True)
class Registration:
    service: str
    node: str
    address: str | None
    app_healthy: bool
    registered_at: str
    # Fingerprints of the roots of the last trust bundle the sidecar acked; () while unknown.
    roots: tuple[str, ...] = ()
    # The root its current certificate chains to; None while unknown.
    cert_root: str | None = None
    # The replica whose stream it is on (its listen address).
    replica: str = ""

    @property
    def key(self) -> str:
        return f"{PREFIX}{self.service}/{self.node}"

    def same_state(self, other: Registration) -> bool:
        """Equal in everything but when it registered: no store write needed."""
        return (self.address, self.app_healthy, self.roots, self.cert_root, self.replica) == (
            other.address, other.app_healthy, other.roots, other.cert_root, other.replica)

    def dump(self) -> bytes:
        return json.dumps({**asdict(self), "roots": list(self.roots)}).encode()

    @classmethod
    def load(cls, data: bytes) -> Registration:
        raw = json.loads(data)
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}  # a newer replica may add fields
        values["roots"] = tuple(values.get("roots") or ())
        return cls(**values)


@dataclass(slots=True)
class _Owned:
    revision: int
    last_seen: float
    registration: Registration = field(compare=False)


class Registry:
    def __init__(self, store: Store, grace: float, on_change: Callable[[], None], *,
                 ephemeral: bool = False, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.grace = grace
        self.ephemeral = ephemeral
        self._on_change = on_change
        self._clock = clock
        self._entries: dict[str, Registration] = {}
        self._revisions: dict[str, int] = {}
        self._owned: dict[str, _Owned] = {}
        self._changed = asyncio.Event()

    # === the view (fed by the store watch) ===

    def on_store(self, key: str, entry: Entry | None) -> None:
        """A registration key changed in the store (anyone's write, or a lease expiry)."""
        if entry is None:
            if self._entries.pop(key, None) is None:
                return
            self._revisions.pop(key, None)
            # An owned key deleted under us (our lease was lost): kept owned, so that the
            # lease-loss rewrite puts it back.
        else:
            if entry.revision <= self._revisions.get(key, 0):
                return  # an older event than what we hold (a replay after a re-list)
            try:
                reg = Registration.load(entry.value)
            except (ValueError, TypeError) as exc:
                log.warning("registration_unreadable", key=key, error=str(exc))
                return
            owned = self._owned.get(key)
            if owned is not None and owned.revision < entry.revision:
                # Someone else wrote it: the sidecar moved to another replica.
                del self._owned[key]
            self._entries[key] = reg
            self._revisions[key] = entry.revision
        self._changed.set()
        self._on_change()

    def adopt_all(self) -> None:
        """One-process mode, at start: the entries found are ours, with a full grace."""
        if self.ephemeral:
            return
        now = self._clock()
        for key, reg in self._entries.items():
            self._owned[key] = _Owned(self._revisions[key], now, reg)

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

    def get(self, service: str, node: str) -> Registration | None:
        return self._entries.get(f"{PREFIX}{service}/{node}")

    async def wait_until(self, predicate: Callable[[list[Registration]], bool],
                         timeout: float) -> None:
        """Wait until ``predicate(registrations)`` holds; TimeoutError after ``timeout``."""
        async with asyncio.timeout(timeout):
            while not predicate(self.registrations()):
                self._changed.clear()
                await self._changed.wait()

    # === what this replica owns ===

    async def register(self, reg: Registration) -> None:
        """Record ``reg`` (a hello, a change, or a heartbeat after expiry)."""
        owned = self._owned.get(reg.key)
        if owned is not None and owned.registration.same_state(reg):
            owned.last_seen = self._clock()
            return
        revision = await self.store.put(reg.key, reg.dump(), ephemeral=self.ephemeral)
        self._owned[reg.key] = _Owned(revision, self._clock(), reg)
        if owned is None or owned.registration.address != reg.address:
            # The moment an endpoint is in the store: where discovery's latency starts
            # (bench/discovery.py measures from this line to the first request routed to it).
            log.info("endpoint_registered", service=reg.service, node=reg.node, address=reg.address)
        self.on_store(reg.key, Entry(reg.key, reg.dump(), revision))

    def heard_from(self, service: str, node: str) -> bool:
        """Refresh last-seen; False when the entry is not ours any more (expired, or another
        replica took it): the caller registers again."""
        owned = self._owned.get(f"{PREFIX}{service}/{node}")
        if owned is None:
            return False
        owned.last_seen = self._clock()
        return True

    async def expire(self) -> list[Registration]:
        """Delete every owned entry unheard of for longer than grace; returns them."""
        now = self._clock()
        gone = []
        for key, owned in list(self._owned.items()):
            if now - owned.last_seen <= self.grace:
                continue
            del self._owned[key]
            try:
                await self.store.delete(key, expect=owned.revision)
            except Conflict:
                continue  # re-written by another replica: the sidecar lives on there
            gone.append(owned.registration)
            self.on_store(key, None)
        return gone

    async def rewrite_owned(self) -> int:
        """Put every owned registration again (after the lease was lost, its keys went with
        it; the put takes a new lease). Returns how many were written."""
        count = 0
        for key, owned in list(self._owned.items()):
            if self._owned.get(key) is not owned:
                continue
            reg = owned.registration
            revision = await self.store.put(key, reg.dump(), ephemeral=self.ephemeral)
            owned.revision = revision
            self.on_store(key, Entry(key, reg.dump(), revision))
            count += 1
        return count
