"""The audit log: one structured JSON record per authentication or authorization decision.

Rules: a filter calls ``record()`` exactly once per decision it makes (allow, deny, or a
dry-run ``would_deny``); ``record()`` never blocks and does no I/O: it puts a tuple on a
bounded queue, and when the queue is full the record is dropped and counted (``dropped``,
read by metrics) and a warning is logged at most once per ``warn_interval``. A writer
thread (so a slow disk never stalls the event loop) turns records into JSON lines and
writes them to the sink: stdout, or a file rotated by size keeping ``keep`` old files.
Each record has ``"event": "audit"``, so on stdout it can be told from the process's other
JSON log lines (``"event": "access"``, ``"ready"``...). Records carry no credentials: no tokens, no keys, no claims beyond the principal.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal, Protocol, TextIO

import structlog

from .clock import Clock, MonotonicClock
from .config.audit import AuditConfig
from .exchange import Exchange

__all__ = [
    "AuditLog",
    "AuditRecorder",
    "AuditSink",
    "Decision",
    "RotatingFileSink",
    "Stage",
    "StreamSink",
    "build_audit_log",
]

log = structlog.get_logger("sidecar.audit")

Stage = Literal["authn", "authz"]
Decision = Literal["allow", "deny", "would_deny"]
_FIELDS = ("time", "request_id", "trace_id", "source", "client", "principal", "service",
           "method", "path", "stage", "decision", "rule", "reason")
_BATCH = 256  # records written per flush
_STOP = object()


class AuditRecorder(Protocol):
    """What filters need: ``AuditLog`` in the sidecar, a list-backed fake in tests."""

    def record(self, exchange: Exchange, stage: Stage, decision: Decision, rule: str,
               reason: str) -> None: ...


class AuditSink(Protocol):
    """Where JSON lines go; called from the writer thread only."""

    def write(self, lines: list[str]) -> None: ...

    def close(self) -> None: ...


class StreamSink:
    """stdout (or any text stream)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout

    def write(self, lines: list[str]) -> None:
        self.stream.write("".join(lines))
        self.stream.flush()

    def close(self) -> None:
        self.stream.flush()


class RotatingFileSink:
    """Appends to ``path``; past ``max_size`` bytes renames it ``path.1`` (and ``path.1`` to
    ``path.2``... up to ``keep``, the oldest deleted) and starts a new file."""

    def __init__(self, path: Path, *, max_size: int, keep: int) -> None:
        self.path = path
        self.max_size = max_size
        self.keep = keep
        self._file = self._open()

    def _open(self) -> TextIO:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # 0o600: the audit log says who called what; not for every local user to read.
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        f = os.fdopen(fd, "a", encoding="utf-8")
        self._size = f.tell()
        return f

    def _rotate(self) -> None:
        self._file.close()
        if self.keep == 0:
            self.path.unlink(missing_ok=True)
        else:
            for i in range(self.keep - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{i}")
                if older.exists():
                    older.replace(self.path.with_name(f"{self.path.name}.{i + 1}"))
            self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        self._file = self._open()

    def write(self, lines: list[str]) -> None:
        for line in lines:
            size = len(line.encode("utf-8"))
            if self._size and self._size + size > self.max_size:
                self._rotate()
            self._file.write(line)
            self._size += size
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class AuditLog:
    """The bounded queue and its writer thread. ``start()`` before the listeners open,
    ``stop()`` after they drain: it writes what is queued (bounded by ``timeout``)."""

    def __init__(self, sink: AuditSink, *, queue_size: int = 10_000,
                 warn_interval: float = 10.0, clock: Clock | None = None,
                 wall: Callable[[], float] = time.time) -> None:
        self.sink = sink
        self.warn_interval = warn_interval
        self.clock = clock or MonotonicClock()
        self.wall = wall
        self.dropped = 0  # records lost to a full queue; never silent: metrics read this
        self.written = 0
        self.write_errors = 0
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_size)
        self._last_warning = float("-inf")
        self._thread: threading.Thread | None = None

    # --- hot path --------------------------------------------------------------------
    def record(self, exchange: Exchange, stage: Stage, decision: Decision, rule: str,
               reason: str) -> None:
        request = exchange.request
        item = (self.wall(), exchange.request_id, exchange.trace_id, exchange.peer_identity,
                exchange.downstream_address, exchange.principal, exchange.service,
                request.method, request.path, stage, decision, rule, reason)
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1
            now = self.clock.monotonic()
            if now - self._last_warning >= self.warn_interval:
                self._last_warning = now
                log.warning("audit_records_dropped", dropped=self.dropped,
                            queue=self._queue.maxsize)

    # --- writer thread ---------------------------------------------------------------
    def _line(self, item: tuple[object, ...]) -> str:
        record: dict[str, object] = {"event": "audit", **dict(zip(_FIELDS, item, strict=True))}
        stamp = datetime.fromtimestamp(float(item[0]), timezone.utc)  # type: ignore[arg-type]
        record["time"] = stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return json.dumps(record, separators=(",", ":"), ensure_ascii=True) + "\n"

    def _drain(self) -> None:
        stopping = False
        while not stopping:
            batch = [self._queue.get()]
            while len(batch) < _BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if _STOP in batch:
                stopping = True
                batch = [b for b in batch if b is not _STOP]
            lines = [self._line(b) for b in batch]  # type: ignore[arg-type]
            try:
                self.sink.write(lines)
                self.written += len(lines)
            except (OSError, ValueError) as exc:  # disk full, closed stream: count, go on
                self.write_errors += len(lines)
                now = self.clock.monotonic()
                if now - self._last_warning >= self.warn_interval:
                    self._last_warning = now
                    log.warning("audit_write_failed", error=str(exc), lost=self.write_errors)

    async def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._drain, name="audit-writer",
                                            daemon=True)
            self._thread.start()

    async def stop(self, timeout: float = 5.0) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return

        def finish() -> None:
            try:
                self._queue.put(_STOP, timeout=timeout)
            except queue.Full:
                pass
            thread.join(timeout)
            if not thread.is_alive():
                self.sink.close()

        await asyncio.to_thread(finish)


def build_audit_log(config: AuditConfig, *, clock: Clock | None = None,
                    base_dir: Path | None = None) -> AuditLog:
    if config.path == "stdout":
        sink: AuditSink = StreamSink()
    else:
        path = Path(config.path)
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        sink = RotatingFileSink(path, max_size=config.max_size, keep=config.keep)
    return AuditLog(sink, queue_size=config.queue, warn_interval=config.warn_interval,
                    clock=clock)
