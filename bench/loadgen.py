"""Load generators: wrk (closed loop), a Python closed-loop fallback, and a Python open-loop pacer.

The open-loop generator measures added latency at a fixed, moderate rate. Request ``i`` is due
at ``t0 + i / rate`` on connection ``i % n`` (so a slow response never delays the next send: a
busy connection just gets a pipelined request), and its latency is counted from that scheduled
time, not from when it was actually written, which avoids coordinated omission. The sender is a
forked process of its own that sleeps to just before each due time and spins the rest: uvloop's
timers fire on a millisecond grid (~0.5 ms p99 late), which would swamp a 0.3 ms target, and a
sender thread would fight the receiver for the GIL. The receiver is a uvloop loop reading the
raw keep-alive sockets with httptools; it knows which request each response answers from the
schedule alone (HTTP/1.1 answers in order on a connection).
"""

from __future__ import annotations

import asyncio
import ctypes
import math
import multiprocessing
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httptools
import uvloop

__all__ = [
    "ClosedLoopResult", "OpenLoopResult", "build_request", "lua_headers", "open_loop", "requests_in_turn",
    "percentile", "python_closed_loop", "run_wrk", "parse_wrk",
]


@dataclass
class ClosedLoopResult:
    generator: str  # "wrk" or "python"
    requests: int
    duration_s: float
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    errors: int  # socket errors + non-2xx/3xx responses
    detail: dict[str, object] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class OpenLoopResult:
    rate: float
    duration_s: float
    connections: int
    sent: int
    completed: int
    errors: int  # non-2xx/3xx, connection failures, and responses missing at the end
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    sender_late_p99_us: float | None  # how far the pacer itself was behind schedule
    sender_late_max_us: float | None

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an already sorted list (q in 0..100)."""
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil
    return sorted_values[int(min(rank, len(sorted_values))) - 1]


# === requests ===========================================================================

_LUA_HEADER = re.compile(r'^\s*wrk\.headers\[\s*"([^"]+)"\s*\]\s*=\s*"([^"]*)"\s*$')


def lua_headers(path: Path) -> list[tuple[str, str]]:
    """The ``wrk.headers["name"] = "value"`` lines of a wrk script, for the Python generators."""
    out = []
    for line in path.read_text().splitlines():
        m = _LUA_HEADER.match(line)
        if m:
            out.append((m.group(1), m.group(2)))
    return out


def build_request(port: int, headers: list[tuple[str, str]]) -> bytes:
    """``GET /`` with Host first, as wrk sends it."""
    lines = [f"GET / HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# === wrk ================================================================================

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(output: str) -> ClosedLoopResult:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    total = re.search(r"(\d+) requests in ([\d.]+\w+),", output)
    if not rps or not total:
        raise ValueError(f"unexpected wrk output:\n{output}")
    lat = dict(re.findall(r"^\s+(50|75|90|99)(?:\.0+)?%\s+(\S+)\s*$", output, re.M))
    errors = 0
    detail: dict[str, object] = {}
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if sock:
        counts = [int(x) for x in sock.groups()]
        detail["socket_errors"] = dict(zip(("connect", "read", "write", "timeout"), counts))
        errors += sum(counts)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non2xx:
        detail["non_2xx_3xx"] = int(non2xx.group(1))
        errors += int(non2xx.group(1))
    return ClosedLoopResult(
        generator="wrk", requests=int(total.group(1)), duration_s=_ms(total.group(2)) / 1e3,
        rps=float(rps.group(1)), p50_ms=_ms(lat["50"]) if "50" in lat else None,
        p99_ms=_ms(lat["99"]) if "99" in lat else None, errors=errors, detail=detail,
    )


def wrk_version() -> str | None:
    if shutil.which("wrk") is None:
        return None
    out = subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=10)
    first = (out.stdout or out.stderr).strip().splitlines()
    return first[0] if first else "unknown"


def run_wrk(port: int, *, connections: int, duration: float, script: Path | None) -> ClosedLoopResult:
    seconds = max(1, math.ceil(duration))  # wrk takes whole seconds
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "5s"]
    if script is not None:
        argv += ["-s", str(script)]
    argv.append(f"http://127.0.0.1:{port}/")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
    result = parse_wrk(out.stdout)
    result.detail["argv"] = argv
    return result


# === Python closed loop (when wrk is missing) ============================================


class _Client(asyncio.Protocol):
    """One keep-alive connection that sends the next request when the last response is done."""

    def __init__(self, request: bytes, deadline: float, latencies: list[float], done: asyncio.Future[None]):
        self.request = request
        self.deadline = deadline
        self.latencies = latencies
        self.done = done
        self.errors = 0
        self.parser = httptools.HttpResponseParser(self)
        self.sent_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self._send()

    def _send(self) -> None:
        self.sent_at = time.perf_counter()
        self.transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.errors += 1
            self.transport.close()

    def on_message_complete(self) -> None:
        now = time.perf_counter()
        if not 200 <= self.parser.get_status_code() < 400:
            self.errors += 1
        self.latencies.append(now - self.sent_at)
        if now < self.deadline:
            self._send()
        else:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if time.perf_counter() < self.deadline:
            self.errors += 1
        if not self.done.done():
            self.done.set_result(None)


def python_closed_loop(port: int, *, connections: int, duration: float,
                       headers: list[tuple[str, str]]) -> ClosedLoopResult:
    """A closed-loop generator like ``wrk -t1``: one uvloop thread, N keep-alive connections."""
    request = build_request(port, headers)

    async def run() -> tuple[list[float], int, float]:
        loop = asyncio.get_running_loop()
        latencies: list[float] = []
        start = time.perf_counter()
        deadline = start + duration
        clients = []
        for _ in range(connections):
            done: asyncio.Future[None] = loop.create_future()
            _, client = await loop.create_connection(
                lambda done=done: _Client(request, deadline, latencies, done), "127.0.0.1", port)
            clients.append(client)
        await asyncio.wait_for(asyncio.gather(*(c.done for c in clients)), duration + 10)
        return latencies, sum(c.errors for c in clients), time.perf_counter() - start

    latencies, errors, elapsed = uvloop.run(run())
    latencies.sort()
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    return ClosedLoopResult(
        generator="python", requests=len(latencies), duration_s=elapsed, rps=len(latencies) / elapsed,
        p50_ms=p50 * 1e3 if p50 is not None else None, p99_ms=p99 * 1e3 if p99 is not None else None,
        errors=errors,
    )


# === open loop ==========================================================================


def _pace(socks: list[socket.socket], request: bytes, t0: float, rate: float, total: int,
          report: multiprocessing.connection.Connection) -> None:
    """The forked sender: request i at t0 + i/rate on socks[i % n]; reports its own lateness."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops us
    late: list[float] = []
    n = len(socks)
    _tight_timer_slack()
    spin = 0.0002  # sleep to 200 µs before the due time, then spin: ~8% of a core at 500 req/s
    for i in range(total):
        due = t0 + i / rate
        gap = due - time.perf_counter()
        if gap > spin:
            time.sleep(gap - spin)
        while time.perf_counter() < due:
            pass
        late.append(time.perf_counter() - due)
        sock = socks[i % n]
        view = memoryview(request)
        try:
            while view:
                try:
                    view = view[sock.send(view):]
                except BlockingIOError:  # the receiver made the socket non-blocking
                    time.sleep(0.0001)
        except OSError:
            pass  # the receiver counts the missing response
    late.sort()
    report.send((percentile(late, 99), late[-1] if late else None))
    report.close()


def _tight_timer_slack() -> None:
    """prctl(PR_SET_TIMERSLACK, 1 ns): the default 50 µs slack makes every sleep overshoot."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(29, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


class _Receiver:
    def __init__(self, index: int, n: int, t0: float, rate: float, latencies: list[float]) -> None:
        self.index = index  # request i answered k-th on this connection is i = index + k*n
        self.n = n
        self.t0 = t0
        self.rate = rate
        self.latencies = latencies
        self.k = 0
        self.errors = 0
        self.closed = False
        self.now = 0.0
        self.parser = httptools.HttpResponseParser(self)

    def on_message_complete(self) -> None:
        due = self.t0 + (self.index + self.k * self.n) / self.rate
        self.k += 1
        if 200 <= self.parser.get_status_code() < 400:
            self.latencies.append(self.now - due)
        else:
            self.errors += 1


def open_loop(port: int, *, rate: float, duration: float, connections: int,
              headers: list[tuple[str, str]], warmup_per_connection: int = 20) -> OpenLoopResult:
    request = build_request(port, headers)
    total = int(rate * duration)
    socks: list[socket.socket] = []
    try:
        for _ in range(connections):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            socks.append(s)
        requests_in_turn(socks, request, warmup_per_connection)
        return _open_loop_measure(socks, request, rate, duration, total)
    finally:
        for s in socks:
            s.close()


def requests_in_turn(socks: list[socket.socket], request: bytes, rounds: int) -> None:
    """One request per connection at a time, ``rounds`` times (the open loop's warm-up fills the
    proxies' upstream pools so; ``bench.instructions`` counts a known number of exchanges); fails
    on the first answer that is not 2xx/3xx, with what it said."""

    class _Response:
        def __init__(self) -> None:
            self.done = False
            self.body = b""

        def on_body(self, body: bytes) -> None:
            self.body += body

        def on_message_complete(self) -> None:
            self.done = True

    for _ in range(rounds):
        for s in socks:
            s.sendall(request)
        for s in socks:
            response = _Response()
            parser = httptools.HttpResponseParser(response)
            while not response.done:
                data = s.recv(65536)
                if not data:
                    raise ConnectionError("connection closed before the response")
                parser.feed_data(data)
            status = parser.get_status_code()
            if not 200 <= status < 400:
                raise ConnectionError(f"got {status}: {response.body[:200]!r}")


def _open_loop_measure(socks: list[socket.socket], request: bytes, rate: float, duration: float,
                       total: int) -> OpenLoopResult:
    n = len(socks)
    t0 = time.perf_counter() + 0.1  # CLOCK_MONOTONIC: the same clock in the forked sender
    ctx = multiprocessing.get_context("fork")
    report_r, report_w = ctx.Pipe(duplex=False)
    sender = ctx.Process(target=_pace, args=(socks, request, t0, rate, total, report_w), daemon=True)
    sender.start()
    report_w.close()
    latencies: list[float] = []
    receivers = [_Receiver(i, n, t0, rate, latencies) for i in range(n)]

    async def receive() -> None:
        loop = asyncio.get_running_loop()
        finished = loop.create_future()
        expected = [len(range(i, total, n)) for i in range(n)]

        def check() -> None:
            if all(r.k >= e or r.closed for r, e in zip(receivers, expected)) and not finished.done():
                finished.set_result(None)

        def readable(s: socket.socket, r: _Receiver) -> None:
            r.now = time.perf_counter()
            try:
                data = s.recv(262144)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                r.closed = True
                loop.remove_reader(s.fileno())
            else:
                try:
                    r.parser.feed_data(data)
                except httptools.HttpParserError:
                    r.closed = True
                    loop.remove_reader(s.fileno())
            check()

        for s, r in zip(socks, receivers):
            s.setblocking(False)
            loop.add_reader(s.fileno(), readable, s, r)
        try:
            await asyncio.wait_for(finished, timeout=(t0 - time.perf_counter()) + duration + 3.0)
        except asyncio.TimeoutError:
            pass
        finally:
            for s in socks:
                loop.remove_reader(s.fileno())

    try:
        uvloop.run(receive())
        sender.join(timeout=5)
    finally:
        if sender.is_alive():
            sender.kill()
        sender.join()
    late_p99, late_max = report_r.recv() if report_r.poll(1) else (None, None)
    report_r.close()
    latencies.sort()
    completed = len(latencies)
    errors = total - completed  # non-2xx/3xx answers, and answers that never came

    def ms(v: float | None) -> float | None:
        return None if v is None else v * 1e3

    return OpenLoopResult(
        rate=rate, duration_s=duration, connections=n, sent=total, completed=completed, errors=errors,
        p50_ms=ms(percentile(latencies, 50)), p90_ms=ms(percentile(latencies, 90)),
        p99_ms=ms(percentile(latencies, 99)), max_ms=ms(latencies[-1] if latencies else None),
        sender_late_p99_us=None if late_p99 is None else late_p99 * 1e6,
        sender_late_max_us=None if late_max is None else late_max * 1e6,
    )
