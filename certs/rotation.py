"""Noticing new certificate files, and deciding when to renew.

`FileWatcher` polls the stat of the cert, key and bundle files (mtime, size,
inode: a rename-into-place changes the inode even within one mtime tick)
and asks the TlsContextSource to reload when they change. Files replaced
one at a time are fine: until key and certificate match again the reload
fails, the old contexts stay, and the next tick tries again.
`renew_at` is pure, for the control-plane mode that renews by itself.
Depends only on asyncio and certs; it reports through callbacks, it does not log.
"""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from certs.ssl_context import TlsContextSource
from certs.tasks import stop_task

__all__ = ["FileStamp", "FileWatcher", "renew_at", "stamp"]

OnChange = Callable[[dict[str, Any]], Awaitable[None] | None]
OnError = Callable[[Exception], Awaitable[None] | None]


def renew_at(not_before: datetime, not_after: datetime) -> datetime:
    """When to renew a certificate: after 2/3 of its lifetime.

    A 24 h certificate is renewed at 16 h, leaving 8 h to retry against an
    unavailable control plane before anything breaks.
    """
    if not_after <= not_before:
        raise ValueError("not_after must be later than not_before")
    return not_before + (not_after - not_before) * 2 / 3


@dataclass(frozen=True, slots=True)
class FileStamp:
    """What we compare to notice a changed file without reading it."""

    inode: int
    size: int
    mtime_ns: int


def stamp(path: Path) -> FileStamp | None:
    """The file's stamp, or None if it cannot be stat-ed right now (mid-rename)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return FileStamp(st.st_ino, st.st_size, st.st_mtime_ns)


class FileWatcher:
    """Polls a TlsContextSource's files and reloads it when they change.

    `on_change(info)` is called (and awaited, if it returns an awaitable)
    after new contexts were swapped in; `on_error(exc)` once per distinct
    failure while the files are unusable - e.g. for a log line. Neither may
    stop the watcher: their own exceptions go to `on_error` / last_error.
    """

    def __init__(
        self,
        source: TlsContextSource,
        on_change: OnChange | None = None,
        *,
        interval: float = 1.0,
        on_error: OnError | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be > 0")
        self.source = source
        self.interval = interval
        self._on_change = on_change
        self._on_error = on_error
        self._sleep = sleep
        # None: nothing applied yet, so the first poll reloads (a no-op when
        # the files are what the source already loaded) and catches changes
        # made between the source's load and the watcher's start.
        self._applied: tuple[FileStamp | None, ...] | None = None
        self._reported: tuple[tuple[FileStamp | None, ...], str] | None = None
        self.last_error: Exception | None = None
        self.reloads = 0
        self._task: asyncio.Task[None] | None = None

    def _stamps(self) -> tuple[FileStamp | None, ...]:
        files = self.source.files
        return (stamp(files.cert), stamp(files.key), stamp(files.bundle))

    async def poll(self) -> bool:
        """One tick: reload if the files changed. True if new contexts were swapped in."""
        stamps = self._stamps()
        if stamps == self._applied:
            return False
        try:
            swapped = self.source.reload()
        except Exception as exc:  # PemError expected; anything else must not end rotation
            # Not applied: the next tick retries, even if nothing else changes.
            self.last_error = exc
            if self._reported != (stamps, str(exc)):
                self._reported = (stamps, str(exc))
                await self._call(self._on_error, exc)
            return False
        self._applied = stamps
        self._reported = None
        self.last_error = None
        if swapped:
            self.reloads += 1
            await self._call(self._on_change, self.source.info())
        return swapped

    async def run(self) -> None:
        """Poll forever, every `interval` seconds; cancel the task to stop."""
        while True:
            await self.poll()
            await self._sleep(self.interval)

    def start(self) -> asyncio.Task[None]:
        """Run in a task on the current loop; the caller owns stopping it."""
        if self._task is not None and not self._task.done():
            raise RuntimeError("FileWatcher already running")
        self._task = asyncio.get_running_loop().create_task(self.run(), name="cert-file-watcher")
        return self._task

    async def stop(self) -> None:
        """Cancel the task and wait for it to end."""
        task, self._task = self._task, None
        await stop_task(task)

    async def _call(self, callback: Callable[[Any], Any] | None, arg: Any) -> None:
        if callback is None:
            return
        try:
            result = callback(arg)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:  # a broken callback must not stop reloads
            self.last_error = exc
            if callback is not self._on_error and self._on_error is not None:
                await self._call(self._on_error, exc)
