"""The replica's view of the shared state: one store watch that drives everything.

Every replica lists the watched prefixes once, then follows one watch on the store, so a
change written by any replica (an apply, a registration, a CA change, a rotation step)
reaches every replica's registry and pusher the same way, its own writes included. The
directory store's watch is in-process, so the one-replica case runs the same code.

Rules: events are handed to ``on_change(key, entry | None)`` in revision order; an event
older than what the view holds for that key is dropped (a replay after a re-list). A lost
watch (etcd compacted, unreachable for long) is re-listed and re-watched; the keys that
changed meanwhile are reported as changes, so nothing is missed, only coalesced. The handler
runs on the watch task: it must be quick (mark dirty, swap an object) or start its own task.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence

import structlog

from control.store import Entry, Store, StoreError, WatchEvent
from control.store_dir import DirectoryStore

__all__ = ["StoreView"]

log = structlog.get_logger("pake.control.view")

_RETRY_MIN = 0.1
_RETRY_MAX = 5.0


class StoreView:
    def __init__(self, store: Store, prefixes: Sequence[str],
                 on_change: Callable[[str, Entry | None], None]) -> None:
        self.store = store
        self.prefixes = tuple(prefixes)
        self._on_change = on_change
        self._held: dict[str, Entry] = {}
        self._watch: AsyncIterator[WatchEvent] | None = None

    def _watched(self, key: str) -> bool:
        return key.startswith(self.prefixes)

    async def load(self) -> None:
        """List every watched key and report each; arms the watch from that point."""
        entries: list[Entry] = []
        for prefix in self.prefixes:
            entries.extend(await self.store.list(prefix))
        if isinstance(self.store, DirectoryStore):
            # In-process: nothing can change between the list above and this line.
            after = self.store.revision
        else:
            # Every event after the newest listed key; older ones are already in the list
            # (a delete replayed is harmless).
            after = max((e.revision for e in entries), default=0)
        self._watch = self.store.watch("", after=after)
        fresh = {e.key: e for e in entries}
        for key in sorted(set(self._held) | set(fresh)):
            old, new = self._held.get(key), fresh.get(key)
            if old != new:
                self._report(key, new)

    def _report(self, key: str, entry: Entry | None) -> None:
        if entry is None:
            self._held.pop(key, None)
        else:
            self._held[key] = entry
        self._on_change(key, entry)

    async def run(self) -> None:
        """Follow the watch until cancelled; re-list and re-watch when it is lost."""
        try:
            await self._follow()
        finally:
            await self._close_watch()

    async def _follow(self) -> None:
        delay = _RETRY_MIN
        while True:
            try:
                if self._watch is None:
                    await self.load()
                assert self._watch is not None
                async for event in self._watch:
                    delay = _RETRY_MIN
                    self._apply(event)
                raise StoreError("the store closed the watch")
            except StoreError as exc:
                log.warning("store_watch_lost", error=str(exc), retry_in_s=delay)
                await self._close_watch()
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX)

    def _apply(self, event: WatchEvent) -> None:
        if not self._watched(event.key):
            return
        held = self._held.get(event.key)
        if held is not None and event.revision <= held.revision:
            return
        if event.kind == "delete":
            if held is not None:
                self._report(event.key, None)
        else:
            self._report(event.key, Entry(event.key, event.value, event.revision))

    async def _close_watch(self) -> None:
        watch, self._watch = self._watch, None
        aclose = getattr(watch, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except StoreError:
                pass

    async def close(self) -> None:
        await self._close_watch()
