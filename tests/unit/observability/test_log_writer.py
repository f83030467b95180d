"""The one way log lines leave the loop: a bounded queue per log, one writer thread per output.

A put never blocks, whatever the output does; past the bound lines are dropped and counted;
what was queued is written at close; the logs sharing an output never interleave mid-line.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sidecar.observability.log_writer import FdSink, LogOutputs, LogWriter


class ListSink:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.writes = 0
        self.closed = False

    def write(self, lines: list[str]) -> None:
        self.writes += 1
        self.lines.extend(lines)

    def close(self) -> None:
        self.closed = True


class BlockedSink(ListSink):
    """Stuck in ``write`` (a reader that stopped reading) until released."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def write(self, lines: list[str]) -> None:
        self.entered.set()
        self.release.wait(10)
        super().write(lines)


@pytest.fixture(autouse=True)
def _no_thread_leak() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    assert not [t for t in set(threading.enumerate()) - before if t.name.startswith("log-writer")]


def test_put_never_blocks_and_counts_drops_past_the_line_bound() -> None:
    sink = BlockedSink()
    writer = LogWriter(sink, name="test").start()
    channel = writer.channel("access", max_lines=3)
    assert channel.put("first\n")
    assert sink.entered.wait(5)  # the writer holds "first" and is stuck in write()
    started = time.perf_counter()
    results = [channel.put(f"n{i}\n") for i in range(10)]
    assert time.perf_counter() - started < 0.05  # no waiting on the stuck output
    assert results == [True] * 3 + [False] * 7
    assert (channel.dropped, channel.pending) == (7, 3)
    sink.release.set()
    assert writer.close()
    assert sink.lines == ["first\n", "n0\n", "n1\n", "n2\n"] and sink.closed
    assert (channel.written, channel.dropped) == (4, 7)


def test_the_character_bound_holds_whatever_the_line_count() -> None:
    sink = BlockedSink()
    writer = LogWriter(sink, name="test").start()
    channel = writer.channel("access", max_lines=1000, max_chars=100)
    channel.put("x\n")
    assert sink.entered.wait(5)
    assert [channel.put("y" * 39 + "\n") for _ in range(4)] == [True, True, False, False]
    assert not channel.put("z" * 101 + "\n")  # bigger than the bound: never queued
    # The line held by the stuck write still counts: 2 + 80 + 18 fits exactly.
    assert not channel.put("y" * 18 + "\n") and channel.put("y" * 17 + "\n")
    assert channel.dropped == 4
    sink.release.set()
    assert writer.close()
    assert channel.put("y" * 99 + "\n")  # what was written no longer counts against the bound


def test_close_writes_everything_queued_in_order() -> None:
    sink = ListSink()
    writer = LogWriter(sink, name="test", linger=0.05).start()
    channel = writer.channel("audit")
    for i in range(5000):
        channel.put(f"{i}\n")
    assert writer.close()
    assert sink.lines == [f"{i}\n" for i in range(5000)]
    assert (channel.written, channel.dropped, channel.pending) == (5000, 0, 0)


def test_close_gives_up_on_a_stuck_output_after_its_timeout() -> None:
    sink = BlockedSink()
    writer = LogWriter(sink, name="test").start()
    channel = writer.channel("access")
    channel.put("a\n")
    assert sink.entered.wait(5)
    channel.put("b\n")
    started = time.perf_counter()
    assert writer.close(timeout=0.1) is False
    assert time.perf_counter() - started < 1.0 and not sink.closed
    sink.release.set()  # the reader is back: the queued line still goes out
    assert writer.close()
    assert sink.lines == ["a\n", "b\n"]


def test_lines_wake_an_idle_writer_and_are_written_in_batches() -> None:
    sink = ListSink()
    writer = LogWriter(sink, name="test", linger=0.2).start()
    channel = writer.channel("events")
    deadline = time.monotonic() + 5
    channel.put("ready\n")
    while not sink.lines and time.monotonic() < deadline:
        time.sleep(0.001)
    assert sink.lines == ["ready\n"]  # an idle writer writes at once, no linger first
    for i in range(1000):  # arrive while the writer lingers: one batch, not 1000 writes
        channel.put(f"{i}\n")
    assert writer.close()
    assert len(sink.lines) == 1001 and sink.writes <= 3


def _wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.001)
    return condition()


@pytest.mark.parametrize("bound", ["lines", "chars"])
def test_a_quarter_of_a_bound_queued_ends_the_writers_linger(bound: str) -> None:
    """A busy writer gathers lines for ``linger`` (one GIL hand-off per batch), but never
    until its log's queue overflows: a quarter of either bound wakes it."""
    sink = ListSink()
    writer = LogWriter(sink, name="test", linger=60).start()
    channel = (writer.channel("access", max_lines=100) if bound == "lines"
               else writer.channel("access", max_chars=400))
    channel.put("first\n")
    assert _wait_until(lambda: sink.lines == ["first\n"] and writer.lingering)
    for i in range(24):  # 24 lines of 4 characters: below a quarter of either bound
        channel.put(f"{i:03d}\n")
    time.sleep(0.2)
    assert len(sink.lines) == 1  # still gathering
    channel.put("024\n")  # the 25th: a quarter of 100 lines, of 400 characters
    assert _wait_until(lambda: len(sink.lines) == 26, timeout=5)  # not 60 s
    assert (channel.dropped, sink.writes) == (0, 2)
    assert writer.close()


def test_logs_sharing_an_output_are_counted_apart_and_never_split() -> None:
    sink = ListSink()
    writer = LogWriter(sink, name="stdout").start()
    access = writer.channel("access")
    audit = writer.channel("audit", max_lines=1)
    putter = threading.Thread(target=lambda: [access.put(f"access {i}\n") for i in range(500)])
    putter.start()  # events are logged off the loop too (to_thread workers, the writers)
    audit.put("audit 0\n")
    putter.join()
    assert writer.close()
    assert sorted(sink.lines) == sorted([f"access {i}\n" for i in range(500)] + ["audit 0\n"])
    assert [line for line in sink.lines if line.startswith("access")] == [f"access {i}\n" for i in range(500)]
    assert (access.written, audit.written) == (500, 1)


def test_write_errors_are_counted_and_the_writer_goes_on() -> None:
    class Flaky(ListSink):
        def write(self, lines: list[str]) -> None:
            if not self.writes:
                self.writes += 1
                raise BrokenPipeError(32, "Broken pipe")
            super().write(lines)

    sink = Flaky()
    writer = LogWriter(sink, name="stdout", linger=0).start()
    channel = writer.channel("access")
    channel.put("lost\n")
    deadline = time.monotonic() + 5
    while not channel.write_errors and time.monotonic() < deadline:
        time.sleep(0.001)
    channel.put("kept\n")
    assert writer.close()
    assert (channel.write_errors, channel.written, sink.lines) == (1, 1, ["kept\n"])


def test_fd_sink_writes_everything_to_a_non_blocking_pipe() -> None:
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETFL, fcntl.fcntl(w, fcntl.F_GETFL) | os.O_NONBLOCK)
    received = bytearray()

    def read() -> None:
        while chunk := os.read(r, 1 << 16):
            received.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    line = "x" * 1023 + "\n"
    sink = FdSink(w, owned=True)
    sink.write([line] * 1024)  # 1 MiB: many times the pipe's buffer, partial writes included
    sink.close()
    reader.join(5)
    os.close(r)
    assert bytes(received) == line.encode() * 1024


def test_outputs_share_a_writer_per_destination_and_sum_drops_by_log(tmp_path: Path) -> None:
    r, w = os.pipe()
    outputs = LogOutputs(stdout_fd=w)
    events = outputs.channel("events")
    access = outputs.channel("access", max_lines=0)  # drops everything: counted
    file_access = outputs.channel("access", tmp_path / "access.log")
    assert events._writer is access._writer is outputs.output("stdout")
    assert file_access._writer is outputs.output(str(tmp_path / "access.log"))
    events.put('{"event":"ready"}\n')
    access.put("dropped\n")
    file_access.put("to the file\n")
    assert outputs.close()
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        assert pipe.read() == b'{"event":"ready"}\n'
    assert (tmp_path / "access.log").read_text() == "to the file\n"
    assert outputs.dropped() == {"events": 0, "access": 1}
