"""The embedded directory store: one process, nothing to install (see control/store.py).

Layout under the root: one file per persistent key at ``<root>/<key>`` (key segments are
checked, so a key can never leave the root), holding ``<revision>\\n<value>``, plus
``.revision``, the highest revision handed out (a delete leaves no file to carry it).
Rules: every write is a temp file + fsync + rename + directory fsync, done off the event loop
(asyncio.to_thread) under one lock, so writes are serialised and ``expect`` is checked against
the state the write will replace. Reads come from memory (the whole store is loaded at open:
it holds configs, tokens and registrations, not bulk data). Ephemeral keys live in memory
only. Watchers get events through bounded queues; one that falls behind loses its watch
(StoreError) instead of growing without bound or slowing writers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from certs.pem import fsync_dir, write_atomic
from control.store import Conflict, Entry, StoreError, WatchEvent

__all__ = ["DirectoryStore"]

_SEGMENT = re.compile(r"^[A-Za-z0-9_.@:-]{1,128}$")
_REVISION_FILE = ".revision"
_DIR_MODE = 0o700
_FILE_MODE = 0o600


def _check_key(key: str) -> list[str]:
    parts = key.split("/")
    if not key or any(not _SEGMENT.match(p) or p in (".", "..") or p.startswith(".")
                      for p in parts):
        raise StoreError(f"invalid store key {key!r}: '/'-separated names of A-Z a-z 0-9 _ . @ : -")
    return parts


class _Watch:
    """One watcher: a prefix and a bounded queue; ``lost`` once it fell behind."""

    def __init__(self, prefix: str, maxsize: int) -> None:
        self.prefix = prefix
        self.queue: asyncio.Queue[WatchEvent | None] = asyncio.Queue(maxsize)
        self.lost: str | None = None

    def offer(self, event: WatchEvent) -> None:
        if self.lost is not None or not event.key.startswith(self.prefix):
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.lost = f"watch on {self.prefix!r} fell behind by more than {self.queue.maxsize} events"
            # Wake the reader so it sees `lost` now rather than after draining the queue.
            with contextlib.suppress(asyncio.QueueFull):
                self.queue.get_nowait()
                self.queue.put_nowait(None)


class _WatchIterator:
    """Registered at creation (not at the first ``__anext__``) so no change slips between."""

    def __init__(self, store: DirectoryStore, watch: _Watch) -> None:
        self._store = store
        self._watch = watch

    def __aiter__(self) -> _WatchIterator:
        return self

    async def __anext__(self) -> WatchEvent:
        if self._watch not in self._store._watches:
            raise StopAsyncIteration
        event = await self._watch.queue.get()
        if self._watch.lost is not None:
            self._store._watches.discard(self._watch)
            raise StoreError(self._watch.lost)
        if event is None:  # the store closed
            raise StopAsyncIteration
        return event

    async def aclose(self) -> None:
        self._store._watches.discard(self._watch)


class DirectoryStore:
    """A Store in a local directory. ``await DirectoryStore.open(path)``, then use, then close."""

    def __init__(self, root: Path, *, watch_queue: int = 4096, history: int = 4096) -> None:
        self.root = root
        self._entries: dict[str, Entry] = {}
        self._ephemeral: set[str] = set()
        self._revision = 0
        self._lock = asyncio.Lock()
        self._watches: set[_Watch] = set()
        self._watch_queue = watch_queue
        # Recent events, so a watch may start from a revision a little in the past.
        self._history: deque[WatchEvent] = deque(maxlen=history)
        self._closed = False

    @classmethod
    async def open(cls, root: Path | str, **kwargs: int) -> DirectoryStore:
        store = cls(Path(root), **kwargs)
        await asyncio.to_thread(store._load)
        return store

    @property
    def revision(self) -> int:
        """The highest revision handed out so far."""
        return self._revision

    # === reading ===

    async def get(self, key: str) -> Entry | None:
        _check_key(key)
        return self._entries.get(key)

    async def list(self, prefix: str) -> list[Entry]:
        return [self._entries[k] for k in sorted(self._entries) if k.startswith(prefix)]

    # === writing ===

    async def put(self, key: str, value: bytes, *, expect: int | None = None,
                  ephemeral: bool = False) -> int:
        _check_key(key)
        async with self._lock:
            self._check_open()
            self._check_expect(key, expect)
            revision = self._revision + 1
            if ephemeral:
                if key in self._entries and key not in self._ephemeral:
                    await self._io(self._remove_file, key, revision)
            else:
                await self._io(self._write_file, key, revision, value)
            self._revision = revision
            self._entries[key] = Entry(key, value, revision)
            if ephemeral:
                self._ephemeral.add(key)
            else:
                self._ephemeral.discard(key)
            self._publish(WatchEvent("put", key, value, revision))
            return revision

    async def delete(self, key: str, *, expect: int | None = None) -> bool:
        _check_key(key)
        async with self._lock:
            self._check_open()
            self._check_expect(key, expect)
            if key not in self._entries:
                return False
            revision = self._revision + 1
            if key not in self._ephemeral:
                await self._io(self._remove_file, key, revision)
            self._revision = revision
            del self._entries[key]
            self._ephemeral.discard(key)
            self._publish(WatchEvent("delete", key, b"", revision))
            return True

    async def _io(self, fn: Callable[..., None], key: str, *args: object) -> None:
        try:
            await asyncio.to_thread(fn, key, *args)
        except OSError as exc:
            # e.g. 'a' is a key and 'a/b' is written: a key cannot also be a folder of keys.
            raise StoreError(f"{key}: cannot write to {self.root}: {exc.strerror or exc}") from None

    def _check_expect(self, key: str, expect: int | None) -> None:
        if expect is None:
            return
        current = self._entries.get(key)
        held = 0 if current is None else current.revision
        if held != expect:
            raise Conflict(f"{key}: expected revision {expect}, the store holds {held}")

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("the store is closed")

    # === watching ===

    def watch(self, prefix: str, *, after: int = 0) -> AsyncIterator[WatchEvent]:
        """``after=0``: changes from now on. ``after=N``: also the held events since N, or
        StoreError when they are no longer held (the caller then re-lists)."""
        watch = _Watch(prefix, self._watch_queue)
        if after:
            oldest = self._history[0].revision if self._history else self._revision + 1
            if after + 1 < oldest and after < self._revision:
                raise StoreError(f"revision {after} is no longer held (oldest {oldest}); re-list")
            for event in self._history:
                if event.revision > after:
                    watch.offer(event)
        self._watches.add(watch)
        return _WatchIterator(self, watch)

    def _publish(self, event: WatchEvent) -> None:
        self._history.append(event)
        for watch in list(self._watches):
            watch.offer(event)

    async def close(self) -> None:
        async with self._lock:
            self._closed = True
            for watch in list(self._watches):
                with contextlib.suppress(asyncio.QueueFull):
                    watch.queue.put_nowait(None)

    # === files (run in a worker thread) ===

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*_check_key(key))

    def _load(self) -> None:
        self.root.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        highest = 0
        with contextlib.suppress(FileNotFoundError, ValueError):
            highest = int((self.root / _REVISION_FILE).read_text().strip() or 0)
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.startswith("."):
                    continue  # .revision, and temp files a crash left behind
                path = Path(dirpath) / name
                key = path.relative_to(self.root).as_posix()
                data = path.read_bytes()
                head, sep, value = data.partition(b"\n")
                if not sep or not head.isdigit():
                    raise StoreError(f"{path}: not a store record (no revision line)")
                revision = int(head)
                self._entries[key] = Entry(key, value, revision)
                highest = max(highest, revision)
        self._revision = highest

    def _write_file(self, key: str, revision: int, value: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        write_atomic(path, b"%d\n" % revision + value, _FILE_MODE)

    def _remove_file(self, key: str, revision: int) -> None:
        # The revision first: once the file is gone, nothing else records that it was used.
        write_atomic(self.root / _REVISION_FILE, b"%d\n" % revision, _FILE_MODE)
        path = self._path(key)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        fsync_dir(path.parent)


