"""The fault suite (issue 12): the local app restarts. A real app *process* behind a real
inbound sidecar (mTLS from a real frontend sidecar), SIGKILLed while it holds a request, then
started again on its port: the in-flight request gets a clear 503 (JSON, flags), ``/readyz``
turns 503 while the app is down and 200 once it is back, and traffic recovers without a
sidecar restart: at once if nothing tripped, else when the breakers that the failures while the
app was down tripped (the inbound sidecar's for the local app, the caller's for the service)
half-open, up to their ``open_for`` (default 5 s) after ``/readyz`` is 200 again.
"""

from __future__ import annotations

import asyncio
import signal
import time
import sys
from pathlib import Path
from typing import Any

import aiohttp

from tests.helpers.pki import make_test_pki
from tests.helpers.sidecar_process import SidecarProcess
from tests.integration.test_mtls import outbound_sidecar, tls_config

# The app: 200 to everything, but holds ``/hang`` (printing it) until it is killed.
APP = r"""
import asyncio, sys
async def serve(reader, writer):
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        if b" /hang " in head.split(b"\r\n", 1)[0]:
            print("holding", flush=True)
            continue
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", int(sys.argv[1]), reuse_address=True)
    print("port", server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()
asyncio.run(main())
"""


class App:
    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(sys.executable, "-c", APP, str(self.port),
                                                         stdout=asyncio.subprocess.PIPE)
        self.port = int((await self.readline()).split()[1])

    async def readline(self) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        async with asyncio.timeout(10):
            return (await self.proc.stdout.readline()).decode()

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()


async def test_the_local_app_restarting_flips_readiness_and_recovers_without_a_sidecar_restart(
        tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path / "pki", services=["echo", "frontend"])
    app = App()
    await app.start()
    try:
        boot = {"service": "echo", "app": f"127.0.0.1:{app.port}", "tls": tls_config(pki.services["echo"]),
                "listeners": {"inbound": {"address": "127.0.0.1:0", "tls": True}, "admin": "127.0.0.1:0"}}
        check = {"path": "/healthz", "interval": "100ms", "jitter": "0ms", "timeout": "100ms",
                 "healthy_threshold": 1, "unhealthy_threshold": 1}
        # the failures while the app is down trip the local app's breaker (frontend retries x
        # echo retries); it stays open for open_for even once the health check passes again
        echo_mesh = {"services": {"echo": {"endpoints": [], "health_check": check,
                                           "breaker": {"open_for": "1s"}}}}
        async with SidecarProcess(tmp_path, bootstrap=boot, mesh=echo_mesh, name="echo-sidecar") as echo:
            # the frontend's breaker for echo trips too (echo answers 503s): 1 s open as well
            services = {"echo": {"endpoints": [f"127.0.0.1:{echo.ports['inbound']}"],
                                 "breaker": {"open_for": "1s"}}}
            async with outbound_sidecar(tmp_path, pki.services["frontend"], services) as front, \
                    aiohttp.ClientSession() as http:

                async def get(path: str) -> tuple[int, str, Any]:
                    async with http.get(front.url() + path, headers={"Host": "echo"}) as r:
                        body = await r.read()
                        return r.status, r.headers.get("x-pake-flags", ""), body

                async def ready() -> int:
                    async with http.get(echo.admin + "/readyz") as r:
                        return r.status

                assert (await get("/before"))[0] == 200 and await ready() == 200
                in_flight = asyncio.create_task(get("/hang"))
                assert (await app.readline()).strip() == "holding"
                await app.kill()
                killed = await in_flight
                [down] = await echo.wait_for_event("endpoint_health")
                ready_down = await ready()
                while_down = await get("/down")

                await app.start()  # the same port
                await echo.wait_for_event("endpoint_health", count=2)
                ready_up = await ready()
                back_at = time.monotonic()
                async with asyncio.timeout(5):
                    while (first_ok := await get("/after/first"))[0] != 200:
                        assert first_ok[:2] == (503, "UO"), first_ok
                        await asyncio.sleep(0.05)
                recovered_in = time.monotonic() - back_at
                after = [await get(f"/after/{i}") for i in range(5)]
                await echo.wait_for_event("access", where=lambda a: a["path"] == "/after/4")
            echo_access = echo.events("access")
    finally:
        await app.kill()

    # the in-flight request: a 503 the sidecar made, saying why, not a reset or a hang
    assert killed[0] == 503 and killed[1] in ("UF", "UF,URX", "UC"), killed
    assert down["healthy"] is False and down["cluster"] == "local-app"
    assert ready_down == 503 and while_down[0] == 503
    assert ready_up == 200
    # each hop's breaker half-opens after its open_for (1 s): recovery without a restart
    assert recovered_in < 2.0, recovered_in
    assert [a[0] for a in after] == [200] * 5, after
    assert {a["path"] for a in echo_access} >= {"/hang", "/down", "/after/4"}
