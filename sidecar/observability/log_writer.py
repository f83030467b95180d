"""Log lines leave the event loop through a bounded queue and one writer thread per output.

A write to stdout blocks when the reader of the pipe stops reading; on the event loop it froze
the whole sidecar. So: ``LogChannel.put`` never blocks and does no I/O. It appends a finished
line (encoded by the caller) to its log's deque, bounded in lines and in characters; past the
bound the line is dropped and counted (``dropped``, read by ``pake_log_dropped_total``). One
``LogWriter`` per output (stdout, or a file) joins the lines of every log sent there and writes
them from its own thread, so lines of different logs never interleave mid-line. The writer
lingers ``linger`` seconds after each write (or until a log has a quarter of its bound
queued): each time the thread runs Python it must win the GIL from the busy loop, and every
GIL release of the loop wakes it to try (about 40 context switches a batch, measured): at
20k lines/s a 5 ms linger cost 0.4 switches and 4 µs of thread CPU per line, 50 ms costs
0.04 and 1 µs. An idle writer writes a line at once. ``close()`` writes what is queued,
bounded by a timeout.

Threads: a deque's ``append`` and ``popleft`` are atomic; each counter has one writing thread
(the putter's side for ``dropped`` and queued characters, the writer's for ``written``, errors
and the characters done, which it sets to the queued count it read before taking a batch: a
line put while it takes one is off by its size until the next batch). Events logged off the
loop (rare) may make the putter's counts off by one.
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from itertools import repeat
from pathlib import Path
from typing import Final, Protocol, TextIO

import structlog

from ..clock import Clock, MonotonicClock

__all__ = ["FdSink", "LineSink", "LogChannel", "LogOutputs", "LogWriter", "StreamSink", "WRITE_CHUNK", "encoded_chunks",
           "open_append"]

log = structlog.get_logger("pake.logging")

MAX_LINES: Final = 10_000  # default bound per log, in lines
MAX_CHARS: Final = 1 << 20  # ... and in characters (about bytes: the lines are ASCII JSON)
LINGER: Final = 0.05  # seconds a busy writer gathers lines between writes (Envoy's access log: 1 s)
_POPLEFT: Final = deque.popleft  # the unbound method: ``map`` calls it for each line
# Lines joined and encoded at a time: a busy batch whole (~256 KiB of lines) was a string and
# its bytes of that size each, the writer's share of the process's peak RSS; ~75 KiB pieces,
# one alive at a time, cost a write call more per 256 lines.
WRITE_CHUNK: Final = 256


def encoded_chunks(lines: list[str]) -> Iterator[tuple[list[str], bytes]]:
    """``lines`` in pieces of ``WRITE_CHUNK``, each with its UTF-8 (unencodable characters
    escaped: the lines are JSON, ASCII but for a process log's odd value), made as the
    caller asks for the next."""
    for start in range(0, len(lines), WRITE_CHUNK):
        piece = lines if len(lines) <= WRITE_CHUNK else lines[start:start + WRITE_CHUNK]
        yield piece, "".join(piece).encode("utf-8", "backslashreplace")


class LineSink(Protocol):
    """Where lines go; called from the writer thread only."""

    def write(self, lines: list[str]) -> None: ...

    def close(self) -> None: ...


class FdSink:
    """A file descriptor written with ``os.write``: stdout (fd 1), or a file opened for
    appending. Not through ``sys.stdout``: a writer blocked in it would hold its buffer's
    lock, and the interpreter aborts at exit when it cannot take that lock to flush."""

    def __init__(self, fd: int, *, owned: bool) -> None:
        self.fd = fd
        self.owned = owned  # close the descriptor on close (a file we opened, not stdout)

    def write(self, lines: list[str]) -> None:
        for _, data in encoded_chunks(lines):
            view = memoryview(data)
            sent = 0
            while sent < len(data):  # an offset, not a view re-sliced to itself: compiled, that resent data
                try:
                    sent += os.write(self.fd, view[sent:])
                except BlockingIOError:  # a descriptor someone made non-blocking: wait here, off the loop
                    select.select([], [self.fd], [])

    def close(self) -> None:
        if self.owned:
            os.close(self.fd)


def open_append(path: Path, mode: int = 0o644) -> FdSink:
    """A file sink appending to ``path`` (created with ``mode``); opened by the caller's
    thread at start-up so a bad path fails there, not in the writer."""
    return FdSink(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, mode), owned=True)


class StreamSink:
    """Any text stream (tests, tools); flushed after each batch."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, lines: list[str]) -> None:
        self.stream.write("".join(lines))
        self.stream.flush()

    def close(self) -> None:
        self.stream.flush()


class LogChannel:
    """One log's way into an output: its own bounded deque and counters."""

    __slots__ = ("name", "max_lines", "max_chars", "dropped", "written", "write_errors",
                 "_lines", "_append", "_queued_chars", "_done_chars", "_writer", "_flush_lines",
                 "_flush_chars")

    def __init__(self, name: str, writer: LogWriter, *, max_lines: int, max_chars: int) -> None:
        self.name = name
        self.max_lines = max_lines
        self.max_chars = max_chars
        self.dropped = 0  # lines refused because the bound was reached
        self.written = 0
        self.write_errors = 0  # lines lost to a failed write (disk full, reader gone)
        self._lines: deque[str] = deque()
        # bound once: compiled, ``self._lines.append(line)`` looks the method up by name on
        # every call (~230 instructions, callgrind), a bound method is called directly (~80)
        self._append = self._lines.append
        self._queued_chars = 0  # put side only
        self._done_chars = 0  # writer side only
        self._writer = writer
        # a quarter of the bound queued ends the writer's linger: a batch never waits for drops
        self._flush_lines = max(1, max_lines // 4)
        self._flush_chars = max(1, max_chars // 4)

    def put(self, line: str) -> bool:
        """Queue one finished line (ending in a newline); False when it was dropped."""
        lines = self._lines
        size = len(line)
        if len(lines) >= self.max_lines or self._queued_chars - self._done_chars + size > self.max_chars:
            self.dropped += 1
            return False
        self._queued_chars += size
        self._append(line)
        writer = self._writer
        if writer.idle or (writer.lingering and (len(lines) >= self._flush_lines or self._queued_chars
                                                 - self._done_chars >= self._flush_chars)):
            writer.wake()
        return True

    @property
    def pending(self) -> int:
        """Lines queued and not yet written."""
        return len(self._lines)


class LogWriter:
    """One output's writer thread, and the channels of the logs written to it."""

    def __init__(self, sink: LineSink, *, name: str, linger: float = LINGER,
                 warn_interval: float = 10.0, clock: Clock | None = None) -> None:
        self.sink = sink
        self.name = name
        self.linger = linger
        self.warn_interval = warn_interval
        self.clock = clock or MonotonicClock()
        self.idle = False  # True while the thread waits for a line: the next put wakes it
        self.lingering = False  # True while it gathers lines after a write: a full batch wakes it
        self._channels: list[LogChannel] = []
        self._wakeup = threading.Lock()  # held while nobody has woken the writer
        self._wakeup.acquire()
        self._closing = False
        self._last_warning = float("-inf")
        self._worker: threading.Thread | None = None  # (not `_thread`: mypyc names its C field `__thread`, a C keyword)

    def channel(self, name: str, *, max_lines: int = MAX_LINES, max_chars: int = MAX_CHARS) -> LogChannel:
        channel = LogChannel(name, self, max_lines=max_lines, max_chars=max_chars)
        self._channels = [*self._channels, channel]  # a new list: the thread iterates the old one
        return channel

    @property
    def channels(self) -> tuple[LogChannel, ...]:
        return tuple(self._channels)

    def start(self) -> LogWriter:
        if self._worker is None and not self._closing:
            self._worker = threading.Thread(target=self._run, name=f"log-writer:{self.name}", daemon=True)
            self._worker.start()
        return self

    def wake(self) -> None:
        self.idle = self.lingering = False  # one wake per wait, not one per put
        try:
            self._wakeup.release()
        except RuntimeError:  # already released: the writer is on its way
            pass

    def close(self, timeout: float = 5.0) -> bool:
        """Write what is queued and stop; blocks up to ``timeout`` (call it off the loop, or
        after it). False when the output did not take the lines in time (a reader that
        stopped reading): the thread is then left to the process's exit."""
        self._closing = True
        thread = self._worker
        if thread is None:
            self.sink.close()
            return True
        self.wake()
        thread.join(timeout)
        if thread.is_alive():
            return False
        self.sink.close()
        return True

    # --- writer thread --------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            if self._write_batch():
                if not self._closing:
                    self.lingering = True  # let lines gather: one GIL hand-off per batch
                    self._wakeup.acquire(timeout=self.linger)
                    self.lingering = False
                continue
            if self._closing:
                return
            self.idle = True
            # Look again after saying so: a put that came just before saw idle False.
            if self._closing or any(channel._lines for channel in self._channels):
                self.idle = False
                continue
            self._wakeup.acquire()

    def _write_batch(self) -> bool:
        taken: list[tuple[LogChannel, int, int]] = []
        lines: list[str] = []
        for channel in self._channels:
            # the characters put so far, read before the lines: what this batch takes is
            # done up to there (a line put in between is settled by the next batch), where
            # summing the lengths cost ~250 instructions a line
            queued = channel._queued_chars
            queue = channel._lines
            count = len(queue)
            if count:
                # popped by map in C, one atomic popleft after another (the putter appends
                # meanwhile): a loop of calls from compiled code cost ~450 instructions a line
                batch = list(map(_POPLEFT, repeat(queue, count)))
                taken.append((channel, count, queued))
                lines += batch
        if not lines:
            return False
        try:
            self.sink.write(lines)
        except (OSError, ValueError) as exc:  # disk full, reader gone, closed stream: count, go on
            for channel, count, queued in taken:
                channel.write_errors += count
                channel._done_chars = queued
            now = self.clock.monotonic()
            if now - self._last_warning >= self.warn_interval:
                self._last_warning = now
                log.warning("log_write_failed", output=self.name, error=str(exc), lost=len(lines))
            return True
        for channel, count, queued in taken:
            channel.written += count
            channel._done_chars = queued
        return True


class LogOutputs:
    """Every log output of the process by destination: all the logs sent to one place (on
    stdout: access, audit and events) share one writer. Made by ``__main__``, which closes
    them after the loop has stopped, so the last lines (``stopped``) are written too."""

    def __init__(self, *, linger: float = LINGER, stdout_fd: int = 1) -> None:
        self.linger = linger
        self.stdout_fd = stdout_fd
        self._writers: dict[str, LogWriter] = {}

    def output(self, path: str | Path, make_sink: Callable[[], LineSink] | None = None) -> LogWriter:
        """The writer for ``path`` ("stdout" or a file), made and started on first use;
        ``make_sink`` builds a special sink (the audit's rotating file) the first time."""
        key = "stdout" if path == "stdout" else str(Path(path).absolute())
        writer = self._writers.get(key)
        if writer is None:
            if make_sink is not None:
                sink = make_sink()
            elif key == "stdout":
                sink = FdSink(self.stdout_fd, owned=False)
            else:
                sink = open_append(Path(key))
            writer = self._writers[key] = LogWriter(sink, name=key, linger=self.linger).start()
        return writer

    def channel(self, log_name: str, path: str | Path = "stdout", *, max_lines: int = MAX_LINES,
                max_chars: int = MAX_CHARS) -> LogChannel:
        return self.output(path).channel(log_name, max_lines=max_lines, max_chars=max_chars)

    def dropped(self) -> dict[str, int]:
        """Lines dropped so far, by log name (summed over outputs)."""
        out: dict[str, int] = {}
        for writer in list(self._writers.values()):
            for channel in writer.channels:
                out[channel.name] = out.get(channel.name, 0) + channel.dropped
        return out

    def close(self, timeout: float = 5.0) -> bool:
        """Write what is queued on every output, within ``timeout`` in all."""
        deadline = time.monotonic() + timeout
        done = True
        for writer in list(self._writers.values()):
            done = writer.close(max(0.0, deadline - time.monotonic())) and done
        return done
