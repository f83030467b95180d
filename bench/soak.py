"""``make soak``: a mesh under mixed traffic for a long while, with faults injected in the middle.

A real ``pakectl serve`` and three joined sidecars (``frontend`` outbound; ``orders`` and
``payments`` inbound over mTLS, each in front of its own app) carry mixed traffic for
``SOAK_SECONDS`` (default 600): small GETs, POSTs with a body, 64 KiB downloads, on kept-alive
and on fresh connections. At a quarter of the time ``pakectl certs rotate``, at half the
control plane is stopped and started again on its address, at three quarters ``pakectl certs
rotate --ca``. It prints the failed requests by kind (goal: 0; none of these faults may fail a
request) and the RSS of every process after warm-up and at the end (goal: flat). Exit status 1
when a request failed. Not in CI: it is long by design. Uses the tests' process helpers.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from tests.helpers.control_process import ControlProcess
from tests.helpers.sidecar_process import JoinedSidecarProcess

WORKERS = 8
BIG = b"x" * 65536
ALLOW = {"default": "deny", "rules": [{"allow": {"from": ["frontend"]}}]}
MESH = {"services": {
    "orders": {"policy": ALLOW},
    "payments": {"policy": ALLOW},
    "frontend": {"routes": [{"match": {"path_prefix": "/pay/"}, "to": [{"service": "payments"}]},
                            {"to": [{"service": "orders"}]}]},
}}
# The driver keeps every log line it reads: no access log, audit records to a rotated file.
QUIET = {"access_log": {"enabled": False}, "audit": {"path": "audit.log", "max_size": "1MiB", "keep": 1}}


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


async def app_server() -> tuple[web.AppRunner, int]:
    async def small(request: web.Request) -> web.Response:
        return web.json_response({"path": request.path})

    async def post(request: web.Request) -> web.Response:
        return web.json_response({"got": len(await request.read())})

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=BIG)

    app = web.Application()
    app.router.add_get("/pay/big", big)
    app.router.add_post("/{tail:.*}", post)
    app.router.add_get("/{tail:.*}", small)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, port


@dataclass
class Traffic:
    url: str
    ok: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    phase: str = "start"
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def worker(self, n: int) -> None:
        rng = random.Random(n)
        timeout = aiohttp.ClientTimeout(total=15)
        kept = aiohttp.ClientSession(timeout=timeout)
        try:
            while not self.stop.is_set():
                fresh = rng.random() < 0.1  # one request in ten on a new connection
                http = aiohttp.ClientSession(timeout=timeout) if fresh else kept
                try:
                    await self.one(http, rng)
                finally:
                    if fresh:
                        await http.close()
        finally:
            await kept.close()

    async def one(self, http: aiohttp.ClientSession, rng: random.Random) -> None:
        kind = rng.choice(("get", "get", "post", "big"))
        try:
            if kind == "get":
                call = http.get(self.url + f"/orders/{rng.randrange(1000)}", headers={"host": "orders"})
            elif kind == "post":
                call = http.post(self.url + "/orders", data=os.urandom(rng.randrange(1, 32768)),
                                 headers={"host": "orders"})
            else:
                call = http.get(self.url + "/pay/big", headers={"host": "payments"})
            async with call as r:
                body = await r.read()
                if r.status == 200 and (kind != "big" or len(body) == len(BIG)):
                    self.ok += 1
                else:
                    self.failed[f"{self.phase}: {kind} {r.status} {r.headers.get('x-pake-flags', '')}"] += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.failed[f"{self.phase}: {kind} {type(exc).__name__}"] += 1


async def pakectl(cp: ControlProcess, *args: str) -> str:
    result = await cp.pakectl(*args)
    if result.code != 0:
        raise SystemExit(f"pakectl {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""


async def soak(seconds: float, workdir: Path) -> int:
    cp = await ControlProcess(workdir / "control").start()
    runners: list[web.AppRunner] = []
    sidecars: list[JoinedSidecarProcess] = []
    try:
        inbound = {"inbound": {"address": "127.0.0.1:0", "tls": True}, "admin": "127.0.0.1:0"}
        for service in ("orders", "payments"):
            runner, port = await app_server()
            runners.append(runner)
            sidecars.append(await JoinedSidecarProcess(
                workdir, service=service, addresses=[cp.listen], token=await cp.token(service),
                app=f"127.0.0.1:{port}", listeners=inbound, extra=QUIET).start())
        frontend = await JoinedSidecarProcess(
            workdir, service="frontend", addresses=[cp.listen], token=await cp.token("frontend"),
            listeners={"outbound": "127.0.0.1:0", "admin": "127.0.0.1:0"}, extra=QUIET).start()
        sidecars.append(frontend)
        (workdir / "mesh.yaml").write_text(yaml.safe_dump(MESH))
        version = (await cp.pakectl("apply", "-f", str(workdir / "mesh.yaml"))).stdout.split()[2]
        for sc in sidecars:
            await sc.wait_config(f"{version}.", timeout=30)

        traffic = Traffic(frontend.url())
        workers = [asyncio.create_task(traffic.worker(n)) for n in range(WORKERS)]
        await asyncio.sleep(min(10.0, seconds / 10))  # warm-up: pools, caches, allocator
        start_rss = snapshot_rss(cp, sidecars)
        started = time.monotonic()
        print(f"soak: {seconds:.0f} s of traffic, {WORKERS} workers", flush=True)

        def clock() -> str:
            return f"[{time.monotonic() - started:5.0f} s]"

        async def at(fraction: float) -> None:
            await asyncio.sleep(max(0.0, started + seconds * fraction - time.monotonic()))

        await at(0.25)
        traffic.phase = "certs rotate"
        print(f"  {clock()} {traffic.ok} ok; certs rotate: "
              f"{await pakectl(cp, 'certs', 'rotate', '--timeout', '30s')}", flush=True)
        await at(0.5)
        traffic.phase = "control-plane restart"
        port = cp.ports["listen"]
        await cp.stop()
        cp = await ControlProcess(workdir / "control").start(listen_port=port)
        print(f"  {clock()} {traffic.ok} ok; control plane restarted on 127.0.0.1:{port}", flush=True)
        await at(0.75)
        traffic.phase = "certs rotate --ca"
        print(f"  {clock()} {traffic.ok} ok; certs rotate --ca: "
              f"{await pakectl(cp, 'certs', 'rotate', '--ca', '--timeout', '30s')}", flush=True)
        await at(1.0)
        traffic.phase = "end"
        end_rss = snapshot_rss(cp, sidecars)
        traffic.stop.set()
        await asyncio.gather(*workers)
        report(traffic, start_rss, end_rss, time.monotonic() - started)
        return 1 if traffic.failed else 0
    finally:
        for sc in sidecars:
            await sc.stop()
        if cp.proc is not None and cp.proc.returncode is None:
            await cp.stop()
        for runner in runners:
            await runner.cleanup()


def snapshot_rss(cp: ControlProcess, sidecars: list[JoinedSidecarProcess]) -> dict[str, int]:
    """RSS in KiB by process. The control plane is a new process after its restart: it is
    compared with the one it replaced."""
    assert cp.proc is not None
    out = {"control plane": rss_kb(cp.proc.pid), "driver + apps": rss_kb(os.getpid())}
    for sc in sidecars:
        assert sc.proc is not None
        out[f"sidecar {sc.bootstrap['service']}"] = rss_kb(sc.proc.pid)
    return out


def report(traffic: Traffic, start: dict[str, int], end: dict[str, int], took: float) -> None:
    total = traffic.ok + sum(traffic.failed.values())
    print(f"\nrequests: {total} in {took:.0f} s ({total / took:.0f}/s), {traffic.ok} ok, "
          f"{sum(traffic.failed.values())} failed")
    for kind, count in traffic.failed.most_common():
        print(f"  failed {count:6d}  {kind}")
    print(f"\n{'process':24} {'RSS start':>10} {'RSS end':>10} {'change':>8}")
    for name, before in start.items():
        after = end[name]
        print(f"{name:24} {before / 1024:8.1f} MiB {after / 1024:6.1f} MiB {100 * (after - before) / before:+7.1f}%")


def main() -> None:
    seconds = float(os.environ.get("SOAK_SECONDS", "600"))
    with tempfile.TemporaryDirectory(prefix="pake-soak-") as tmp:
        code = asyncio.run(soak(seconds, Path(tmp)))
    sys.exit(code)


if __name__ == "__main__":
    main()
