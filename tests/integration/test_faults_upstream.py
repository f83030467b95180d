"""The fault suite (issue 12), upstream faults: a real sidecar in front of a real upstream
*process* that the test kills with SIGKILL while it holds a request, and of upstreams that
hang, so every case is what an operator meets when a service dies or stalls.

Pass criteria, from the issue: killed before the response head -> 503 ``UF`` or a retry that
lands on a second endpoint; killed mid-response -> the client sees a truncated body and a closed
connection (never a short "complete" response) and a POST is not retried; a slow upstream ->
504 ``UT`` at the route timeout ± 10 %; breaker overflow -> exactly ``max_requests`` reach the
upstream, the rest get 503 ``UO`` at once; every endpoint unhealthy -> a fast 503 ``UH`` (with
``panic_threshold: 0%``; by default a cluster whose endpoints are mostly down uses them all).

Covered elsewhere, exactly: a refused endpoint ejected and traffic shifted to the other one
(``test_endpoint_failure_scope.py::test_one_refusing_endpoint_of_two_fails_no_request_with_the_default_config``:
2000 requests, ≤ 3 failed, the endpoint ejected, the breaker never tripped).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.helpers.flaky_upstream import HANG, FlakyUpstream
from tests.helpers.sidecar_process import SidecarProcess

BOOT = {"service": "client"}  # outbound only: the services it calls are in the mesh
QUIET = {"breaker": {"consecutive_failures": 0}, "outlier": {"consecutive_5xx": 0}}

# The victim: an HTTP/1.1 server that prints one line per request head it reads and then
# holds it (``/hang``) or sends half a response (``/half``: 1000 bytes announced, 100 sent),
# until the test kills it. A process of its own, so the kill is the kernel's, not a close().
VICTIM = r"""
import asyncio, sys
async def serve(reader, writer):
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        line = head.split(b"\r\n", 1)[0].decode()
        length = next((int(h.split(b":", 1)[1]) for h in head.lower().split(b"\r\n")
                       if h.startswith(b"content-length:")), 0)
        await reader.readexactly(length)
        print("request", line, flush=True)
        if " /half" in line:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n" + b"x" * 100)
async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    print("port", server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()
asyncio.run(main())
"""


class Victim:
    """The victim process; ``requests`` are its printed request lines."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self.requests: list[str] = []
        self._line = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def __aenter__(self) -> Victim:
        self.proc = await asyncio.create_subprocess_exec(sys.executable, "-c", VICTIM,
                                                         stdout=asyncio.subprocess.PIPE)
        assert self.proc.stdout is not None
        async with asyncio.timeout(10):
            self.port = int((await self.proc.stdout.readline()).split()[1])
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.requests.append(line.decode().split(" ", 1)[1].strip())
            self._line.set()

    async def wait_request(self, count: int = 1, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.requests) < count:
                self._line.clear()
                await self._line.wait()

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.returncode is None:
            await self.kill()
        if self._reader is not None:
            await self._reader


async def request(http: aiohttp.ClientSession, sc: SidecarProcess, path: str, *,
                  method: str = "GET") -> tuple[int, str, dict[str, Any]]:
    async with http.request(method, sc.url() + path, headers={"Host": "orders"},
                            data=b"body" if method == "POST" else None) as r:
        body = await r.read()
        return r.status, r.headers.get("x-pake-flags", ""), json.loads(body) if r.status >= 500 else {}


async def test_killed_before_the_response_head_a_get_moves_to_the_second_endpoint(tmp_path: Path) -> None:
    async with Victim() as victim, FlakyUpstream() as good:
        # The victim first, and round robin: the first request lands on it.
        mesh = {"services": {"orders": {"endpoints": [victim.address, good.address],
                                        **QUIET}}}
        async with SidecarProcess(tmp_path, bootstrap=BOOT, mesh=mesh) as sc, \
                aiohttp.ClientSession() as http:
            in_flight = asyncio.create_task(request(http, sc, "/hang"))
            await victim.wait_request()
            await victim.kill()
            status, flags, _ = await in_flight
            [access] = await sc.wait_for_event("access")

    assert (status, flags) == (200, "")
    assert [(r.path, r.attempt) for r in good.requests] == [("/hang", 2)]
    assert access["attempts"] == 2 and access["upstream"] == good.address


async def test_killed_before_the_response_head_alone_is_503_uf(tmp_path: Path) -> None:
    async with Victim() as victim:
        mesh = {"services": {"orders": {"endpoints": [victim.address], **QUIET}}}
        async with SidecarProcess(tmp_path, bootstrap=BOOT, mesh=mesh) as sc, \
                aiohttp.ClientSession() as http:
            in_flight = asyncio.create_task(request(http, sc, "/hang"))
            await victim.wait_request()
            await victim.kill()
            killed = await in_flight
            after = await request(http, sc, "/after")  # nobody listens on the port now

    # the in-flight GET was retried once (reset before a response byte), and that try was
    # refused: the client gets the connect failure and "retries exhausted", not a hang or a reset
    assert killed[:2] == (503, "UF,URX") and killed[2]["error"] == "upstream_connect_failure"
    assert after[:2] == (503, "UF,URX")


async def test_killed_mid_response_truncates_and_closes_and_a_post_is_not_retried(tmp_path: Path) -> None:
    async with Victim() as victim, FlakyUpstream() as good:
        aggressive = {"attempts": 2, "on": ["reset", "5xx", "connect-failure"], "budget": "100%"}
        mesh = {"services": {"orders": {"endpoints": [victim.address, good.address],
                                        "retries": aggressive, **QUIET}}}
        async with SidecarProcess(tmp_path, bootstrap=BOOT, mesh=mesh) as sc, \
                aiohttp.ClientSession() as http:
            async with http.get(sc.url() + "/half", headers={"Host": "orders"}) as resp:
                assert resp.status == 200 and resp.headers["content-length"] == "1000"
                first = await resp.content.readexactly(100)
                await victim.kill()
                with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError)):
                    await resp.read()
            # a POST held by a (new) victim that dies before answering: not sent again
            async with Victim() as second:
                mesh["services"]["orders"]["endpoints"] = [second.address, good.address]
                sc.write_config(mesh=mesh)
                sc.send_signal(signal.SIGHUP)
                await sc.wait_for_event("reloaded")
                posted_to_good = len(good.requests)
                while True:  # round robin: the next POST or the one after lands on the victim
                    post = asyncio.create_task(request(http, sc, "/pay", method="POST"))
                    arrived = asyncio.create_task(second.wait_request())
                    await asyncio.wait({post, arrived}, return_when=asyncio.FIRST_COMPLETED)
                    if arrived.done():
                        break
                    arrived.cancel()
                    assert (await post)[0] == 200
                await second.kill()
                posted = await post
                posted_to_good = len(good.requests) - posted_to_good
            accesses = await sc.wait_for_event("access", count=2)

    assert first == b"x" * 100
    half = next(a for a in accesses if a["path"] == "/half")
    assert half["status"] == 200 and half["bytes_out"] == 100 and half["attempts"] == 1
    assert "/half" not in {r.path for r in good.requests}  # not retried once it had started
    assert second.requests == ["POST /pay HTTP/1.1"]
    assert posted[0] in (502, 503) and posted[1] in ("UC", "UF")
    # the good endpoint saw only the POSTs that round robin sent it first, none a second try
    assert posted_to_good <= 1 and all(r.attempt == 1 for r in good.requests if r.method == "POST")


async def test_a_slow_upstream_is_504_ut_at_the_route_timeout(tmp_path: Path) -> None:
    async with FlakyUpstream(lambda r: HANG) as slow:
        mesh = {"services": {"orders": {"endpoints": [slow.address], "timeouts": {"route": "1s"}, **QUIET}}}
        async with SidecarProcess(tmp_path, bootstrap=BOOT, mesh=mesh) as sc, \
                aiohttp.ClientSession() as http:
            elapsed = []
            for i in range(3):
                start = time.perf_counter()
                status, flags, body = await request(http, sc, f"/{i}")
                elapsed.append(time.perf_counter() - start)
                assert (status, flags, body["error"]) == (504, "UT", "upstream_timeout")
            accesses = await sc.wait_for_event("access", count=3)

    assert all(0.9 <= e <= 1.1 for e in elapsed), elapsed
    assert all(900 <= a["duration_ms"] <= 1100 for a in accesses), [a["duration_ms"] for a in accesses]


async def test_breaker_overflow_lets_exactly_max_requests_reach_the_upstream(tmp_path: Path) -> None:
    async with FlakyUpstream(lambda r: HANG) as stuck:
        mesh = {"services": {"orders": {"endpoints": [stuck.address], "breaker": {"max_requests": 3},
                                        "retries": {"attempts": 0}, "timeouts": {"route": "3s"}}}}
        async with SidecarProcess(tmp_path, bootstrap=BOOT, mesh=mesh) as sc, \
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            held = [asyncio.create_task(request(http, sc, f"/held/{i}")) for i in range(3)]
            await stuck.wait_for_requests(3)
            start = time.perf_counter()
            over = await asyncio.gather(*(request(http, sc, f"/over/{i}") for i in range(10)))
            overflow_took = time.perf_counter() - start
            reached = len(stuck.requests)
            for task in held:
                task.cancel()
            await asyncio.gather(*held, return_exceptions=True)

    assert reached == 3, [r.path for r in stuck.requests]
    assert {(s, f, b["error"]) for s, f, b in over} == {(503, "UO", "upstream_overflow")}
    assert overflow_took < 1.0, "an overflow is refused at once, not queued"


async def test_every_endpoint_unhealthy_is_a_fast_503_uh(tmp_path: Path) -> None:
    async with FlakyUpstream() as one, FlakyUpstream() as two:
        one.health_status = two.health_status = 503
        check = {"path": "/healthz", "interval": "100ms", "jitter": "0ms", "timeout": "100ms",
                 "healthy_threshold": 1, "unhealthy_threshold": 1}
        # panic_threshold 0%: never fall back to unhealthy endpoints. (The default, 50%, is
        # Envoy's panic mode, documented in config/load_balancing.py: with most endpoints
        # marked down the health signal is more likely wrong, and they all get traffic.)
        mesh = {"services": {"orders": {"endpoints": [one.address, two.address], "health_check": check,
                                        "load_balancer": {"panic_threshold": "0%"}}}}
        async with SidecarProcess(tmp_path, bootstrap=BOOT, mesh=mesh) as sc, \
                aiohttp.ClientSession() as http:
            await sc.wait_for_event("endpoint_health", count=2)
            timings, answers = [], []
            for i in range(20):
                start = time.perf_counter()
                answers.append(await request(http, sc, f"/{i}"))
                timings.append(time.perf_counter() - start)

    assert {(s, f, b.get("error")) for s, f, b in answers} == {(503, "UH", "no_healthy_upstream")}, answers[:3]
    assert max(timings) < 0.25, timings  # answered by the sidecar, no connect, no timeout
    assert one.requests == [] and two.requests == []
