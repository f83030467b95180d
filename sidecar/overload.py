"""The overload monitor: past a memory (or event-loop lag) threshold, new requests get a fast
503 ``OL`` and keep-alive is off, until the process is back below it.

Sampled on a timer (``overload.interval``), never per request: resident memory from
``/proc/self/statm`` (one ``pread`` on a descriptor kept open: procfs never blocks on a disk)
and the loop lag as how late that same timer fired. The decision is the pure ``overloaded``;
the hot path reads one attribute, ``ServerState.overload`` (the reply, or None). A refusal
costs no upstream, no filter and no buffer, and ``connection: close`` sheds the connection
too, so a spike of connections or requests cannot drive the process into the OOM killer.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING

import structlog
from .observability.exposition import CollectorRegistry, Gauge

from .config.model import OverloadConfig
from .errors import ProxyError

if TYPE_CHECKING:
    from .listener.connection import ServerState

__all__ = ["OverloadMonitor", "Overloaded", "overloaded", "read_rss"]

log = structlog.get_logger("pake.sidecar.overload")

_PAGE = os.sysconf("SC_PAGE_SIZE")


class Overloaded(ProxyError):
    """The sidecar is past its memory or loop-lag threshold: refused before any work."""

    status, error, flag = 503, "overloaded", "OL"
    close = True  # keep-alive is off while overloaded: shedding connections sheds memory


def read_rss(fd: int) -> int:
    """Resident bytes of this process: the second field of ``/proc/self/statm`` (pages)."""
    return int(os.pread(fd, 128, 0).split()[1]) * _PAGE


def overloaded(config: OverloadConfig, rss: int, lag: float) -> str | None:
    """Pure: which threshold is passed (``memory`` first), or None."""
    if config.max_memory is not None and rss >= config.max_memory:
        return "memory"
    if config.max_loop_lag is not None and lag >= config.max_loop_lag:
        return "loop_lag"
    return None


class OverloadMonitor:
    """Samples, decides and sets ``state.overload``; ``configure`` applies a reload."""

    def __init__(self, config: OverloadConfig, state: ServerState, loop: asyncio.AbstractEventLoop,
                 registry: CollectorRegistry) -> None:
        self.config = config
        self.state = state
        self.loop = loop
        self.reason: str | None = None
        self.rss = 0
        self.lag = 0.0
        self._fd: int | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0
        Gauge("pake_overload_active", "1 while new requests get 503 OL (memory or loop lag past "
              "its threshold)", registry=registry).set_function(lambda: self.reason is not None)
        Gauge("pake_process_resident_memory_bytes", "Resident memory, as the overload monitor "
              "last sampled it", registry=registry).set_function(lambda: self.rss)
        Gauge("pake_event_loop_lag_seconds", "How late the overload monitor's timer last fired",
              registry=registry).set_function(lambda: self.lag)

    def start(self) -> None:
        self._fd = os.open("/proc/self/statm", os.O_RDONLY)
        self._sample()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def configure(self, config: OverloadConfig) -> None:
        """A reload: the new thresholds apply now (a raised one ends an overload at once)."""
        if config != self.config:
            self.config = config
            if self._fd is not None:
                self._decide()

    def _sample(self) -> None:
        now = self.loop.time()
        self.lag = max(0.0, now - self._due) if self._due else 0.0
        assert self._fd is not None
        self.rss = read_rss(self._fd)
        self._decide()
        self._due = now + self.config.interval
        self._timer = self.loop.call_at(self._due, self._sample)

    def _decide(self) -> None:
        reason = overloaded(self.config, self.rss, self.lag)
        if reason == self.reason:
            return
        if reason is not None:
            log.warning("overload_started", reason=reason, rss=self.rss, max_memory=self.config.max_memory,
                        loop_lag_s=round(self.lag, 4), max_loop_lag_s=self.config.max_loop_lag)
        else:
            log.info("overload_ended", rss=self.rss, loop_lag_s=round(self.lag, 4))
        self.reason = reason
        # read by every new request (DownstreamConnection._advance)
        self.state.overload = None if reason is None else Overloaded(
            "the sidecar is over its loop-lag threshold" if reason == "loop_lag"
            else "the sidecar is over its memory threshold").reply()
