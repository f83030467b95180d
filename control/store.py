"""The control plane's state, behind one small interface: an embedded directory (one
process, nothing to install) or etcd v3 (several replicas serving one mesh).

Keys are '/'-separated paths (``config/current``, ``registry/orders/node-1``,
``tokens/<id>``); values are bytes (JSON by convention). Every write returns the key's new
revision, and a write may demand the revision it read (``expect``), so that two
concurrent writers cannot both win: the loser gets ``Conflict`` and re-reads. An
*ephemeral* key lives only as long as the replica that wrote it (etcd: attached to the
replica's lease; directory: never written to disk), which is how a dead replica's
registrations disappear.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, Protocol

__all__ = ["Conflict", "Entry", "Store", "StoreError", "WatchEvent"]


class StoreError(Exception):
    """The store cannot be reached or answered with an error (the message says which)."""


class Conflict(StoreError):
    """A write's ``expect`` no longer matches: someone else wrote the key since it was read."""


@dataclass(frozen=True, slots=True)
class Entry:
    key: str
    value: bytes
    revision: int  # the key's modification revision; never 0 for a stored key


@dataclass(frozen=True, slots=True)
class WatchEvent:
    kind: Literal["put", "delete"]
    key: str
    value: bytes  # b"" for a delete
    revision: int


class Store(Protocol):
    async def get(self, key: str) -> Entry | None:
        """The key's value and revision, or None when absent."""
        ...

    async def list(self, prefix: str) -> list[Entry]:
        """Every key under ``prefix``, sorted by key."""
        ...

    async def put(self, key: str, value: bytes, *, expect: int | None = None,
                  ephemeral: bool = False) -> int:
        """Write ``key``; returns its new revision. ``expect``: the revision the caller read
        (0: the key must not exist yet), else ``Conflict``. ``ephemeral``: see the module doc."""
        ...

    async def delete(self, key: str, *, expect: int | None = None) -> bool:
        """Remove ``key`` (False when it was absent); ``expect`` as for ``put``."""
        ...

    def watch(self, prefix: str, *, after: int = 0) -> AsyncIterator[WatchEvent]:
        """Changes under ``prefix`` with a revision greater than ``after``, in revision order,
        until the iterator is closed. Raises ``StoreError`` when the watch is lost."""
        ...

    async def close(self) -> None:
        """Release connections, revoke this replica's lease (its ephemeral keys go)."""
        ...
