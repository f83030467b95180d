"""The demo's log shipper: every sidecar's audit records, sent to the ``audit`` service.

Each sidecar writes one JSON line per authentication and authorization decision to its
stdout (``audit: {path: stdout}``), which the demo reads anyway; this shipper picks the
``"event":"audit"`` lines out and posts them in batches to the audit app's ``/ingest``, as a
node-local log agent (Fluent Bit, Vector) would. It posts to the app's loopback port, not
through the mesh: the records of its own deliveries would otherwise be audited and shipped
again, forever. Bounded: at most ``MAX_QUEUED`` records wait (the oldest are dropped and
counted), a batch holds at most ``MAX_BATCH``, a delivery that fails is dropped and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from typing import Any

import aiohttp

__all__ = ["AuditShipper"]

MAX_QUEUED = 10_000
MAX_BATCH = 500
INTERVAL = 0.25  # seconds between deliveries


class AuditShipper:
    def __init__(self) -> None:
        self._queue: deque[dict[str, Any]] = deque(maxlen=MAX_QUEUED)
        self._wake = asyncio.Event()
        self.shipped = 0
        self.dropped = 0
        self.url: str | None = None
        self._inflight = 0
        self._task: asyncio.Task[None] | None = None

    def offer(self, source: str, line: str) -> None:
        """A line of a sidecar's output; audit records are kept for the next delivery."""
        if '"event":"audit"' not in line:
            return
        try:
            record = json.loads(line)
        except ValueError:
            return
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1
        self._queue.append(record)
        self._wake.set()

    def start(self, url: str, http: aiohttp.ClientSession) -> None:
        self.url = url
        self._task = asyncio.create_task(self._run(http), name="audit-shipper")

    async def _run(self, http: aiohttp.ClientSession) -> None:
        assert self.url is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch = [self._queue.popleft() for _ in range(min(MAX_BATCH, len(self._queue)))]
                self._inflight = len(batch)
                try:
                    async with http.post(self.url, json=batch,
                                         timeout=aiohttp.ClientTimeout(total=5)) as resp:
                        await resp.read()
                        if resp.status == 200:
                            self.shipped += len(batch)
                        else:
                            self.dropped += len(batch)
                except (aiohttp.ClientError, TimeoutError):
                    self.dropped += len(batch)
                finally:
                    self._inflight = 0
            await asyncio.sleep(INTERVAL)

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait until what was offered so far is delivered (the tour reads audit next)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self._queue or self._inflight:
                    await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
