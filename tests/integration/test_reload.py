"""Reloads as the control plane will do them: often, under load (issue 8).

A request keeps the snapshot it was parsed under, clusters included: under pipelined load,
SIGHUPs that move a host (and its endpoint) between services fail no request and misroute
none. Superseded snapshots let go of their pools and health checkers once their last
request is done, so many reloads leak nothing. ``sidecar.yaml`` changes apply live where
they can; the rest shows up as ``restart_required``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from sidecar.app import Sidecar
from sidecar.observability.log_writer import LogOutputs
from sidecar.config.load import load_bootstrap, parse_mesh
from tests.helpers.sidecar_process import SidecarProcess
from tests.helpers.upstreams import RecordingUpstream

TIMEOUT = 10.0


def named(name: str) -> bytes:
    """An upstream that answers every request with its own name."""
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(name), name.encode())


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    status_line, *lines = head.strip().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    body = await reader.readexactly(int(headers["content-length"]))
    return int(status_line.split()[1]), headers, body


# === one snapshot per request, under load ======================================================


def moving_meshes(x: str, y: str, z: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two meshes between which host ``h`` and endpoint ``x`` move from service ``one`` to
    ``two``, and service ``gone`` (host ``g``) disappears. Whatever snapshot a request runs
    under, ``h`` is answered by x; ``k`` by y (first mesh) or z (second), never x; ``g`` by y
    or a 404 "no route". A request routed under one snapshot and sent to a cluster of the
    other gets z or y for ``h``, x for ``k``, and 404 "no cluster 'gone'" for ``g``."""
    first = {"services": {
        "one": {"hosts": ["h"], "endpoints": [x]},
        "two": {"hosts": ["k"], "endpoints": [y]},
        "gone": {"hosts": ["g"], "endpoints": [y]}}}
    second = {"services": {
        "one": {"hosts": ["k"], "endpoints": [z]},
        "two": {"hosts": ["h"], "endpoints": [x]}}}
    return first, second


async def pipelined_load(port: int, stop: asyncio.Event, answers: list[tuple[str, int, bytes]]) -> None:
    """One connection sending batches of 12 pipelined requests (hosts h, k, g in turn) until
    ``stop``; every answer is recorded as (host, status, body)."""
    hosts = ["h", "k", "g"] * 4
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while not stop.is_set():
            writer.write(b"".join(f"GET /{i} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
                                  for i, host in enumerate(hosts)))
            for host in hosts:
                async with asyncio.timeout(TIMEOUT):
                    status, _, body = await read_response(reader)
                answers.append((host, status, body))
    finally:
        writer.close()


async def test_reloads_under_pipelined_load_fail_and_misroute_nothing(tmp_path: Path) -> None:
    async with RecordingUpstream(named("x")) as x, RecordingUpstream(named("y")) as y, \
            RecordingUpstream(named("z")) as z:
        first, second = moving_meshes(x.address, y.address, z.address)
        async with SidecarProcess(tmp_path, bootstrap={"service": "client"}, mesh=first) as sc:
            stop = asyncio.Event()
            answers: list[tuple[str, int, bytes]] = []
            load = [asyncio.create_task(pipelined_load(sc.ports["outbound"], stop, answers))
                    for _ in range(4)]
            try:
                for n in range(1, 7):  # six SIGHUPs, each swapping the other mesh in
                    seen = len(answers)
                    while len(answers) < seen + 200:  # load runs across every swap
                        await asyncio.wait(load, timeout=0.01)
                        assert not any(t.done() for t in load), [t.exception() for t in load if t.done()]
                    sc.write_config(mesh=second if n % 2 else first)
                    sc.send_signal(signal.SIGHUP)
                    await sc.wait_for_event("reloaded", count=n)
                seen = len(answers)
                while len(answers) < seen + 200:
                    await asyncio.wait(load, timeout=0.01)
            finally:
                stop.set()
                await asyncio.gather(*load)

        wrong = []
        for host, status, body in answers:
            if host == "h":
                ok = (status, body) == (200, b"x")
            elif host == "k":
                ok = (status, body) in ((200, b"y"), (200, b"z"))
            else:
                ok = (status, body) == (200, b"y") or (
                    status == 404 and json.loads(body)["detail"].startswith("no route"))
            if not ok:
                wrong.append((host, status, body[:60]))
        assert len(answers) > 1000
        assert not wrong, f"{len(wrong)} of {len(answers)} wrong, e.g. {wrong[:5]}"
        assert not sc.events("reload_rejected")


# === many swaps leak nothing ====================================================================


@pytest.fixture
async def slow_upstream() -> Any:
    """An aiohttp upstream: ``/slow`` answers once ``release`` is set; ``/health`` is 200."""
    release, arrived = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        arrived.set()
        await release.wait()
        return web.Response(text="slow")

    async def fast(request: web.Request) -> web.Response:
        return web.Response(text="fast")

    app = web.Application()
    app.router.add_get("/slow", slow)
    app.router.add_get("/{tail:.*}", fast)
    async with TestServer(app, host="127.0.0.1", port=0) as server:
        yield server, release, arrived
        release.set()


def health_tasks() -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if t.get_name().startswith("health_check:")}


async def test_many_swaps_keep_pools_and_health_checkers_flat(tmp_path: Path, slow_upstream: Any) -> None:
    server, release, arrived = slow_upstream
    upstream = f"127.0.0.1:{server.port}"
    checked = {"path": "/health", "interval": "50ms", "jitter": "10ms"}
    (tmp_path / "sidecar.yaml").write_text(yaml.safe_dump({
        "service": "client", "mesh": "mesh.yaml",
        "listeners": {"outbound": "127.0.0.1:0", "admin": "127.0.0.1:0"}}))
    bootstrap = load_bootstrap(tmp_path / "sidecar.yaml")

    def mesh(i: int) -> Any:
        # each snapshot moves the endpoint to a new service: a new pool and a new health
        # checker every time, and the old ones must go
        return parse_mesh({"services": {f"s{i}": {"hosts": ["app"], "endpoints": [upstream],
                                                  "health_check": checked}}})

    sidecar = Sidecar(bootstrap, mesh(0), logs=LogOutputs())
    await sidecar.start()
    try:
        url = f"http://127.0.0.1:{sidecar.ports()['outbound']}"
        async with aiohttp.ClientSession() as http:
            # one request parsed under snapshot 0 is still running across 100 swaps
            slow = asyncio.create_task(http.get(url + "/slow", headers={"Host": "app"}))
            await asyncio.wait_for(arrived.wait(), TIMEOUT)
            for i in range(1, 101):
                await sidecar.apply(mesh(i))
                if i % 25 == 0:
                    async with http.get(url + "/", headers={"Host": "app"}) as resp:
                        assert (resp.status, await resp.text()) == (200, "fast")
            assert len(sidecar.clusters.retiring) == 1  # snapshot 0, held by the slow request
            assert sidecar.clusters.live_pools() == 2  # snapshot 0's and the current one
            release.set()
            resp = await slow
            assert (resp.status, await resp.text()) == (200, "slow")  # from snapshot 0's cluster
            resp.release()
        async with asyncio.timeout(TIMEOUT):  # the retired health checkers have stopped
            await sidecar.clusters.settled()
        assert not sidecar.clusters.retiring
        assert sidecar.clusters.live_pools() == 1
        assert sidecar.clusters.live_health_checkers() == 1
        assert [t.get_name() for t in health_tasks()] == ["health_check:s100"]
        metrics = sidecar.metrics.render().decode()
        assert "pake_pools 1.0" in metrics and "pake_health_checkers 1.0" in metrics
        assert "pake_retiring_snapshots 0.0" in metrics
    finally:
        sidecar.stopping.set()
        await sidecar.drain()
    assert not health_tasks()


# === SIGHUP and sidecar.yaml ====================================================================


async def config(sc: SidecarProcess) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(sc.admin + "/config") as resp:
        assert resp.status == 200
        return dict(await resp.json())


async def get(port: int, host: str, extra: str = "") -> tuple[int, bytes]:
    """One request on a new connection (a connection parses with the limits of its time)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode())
        async with asyncio.timeout(TIMEOUT):
            status, _, body = await read_response(reader)
        return status, body
    finally:
        writer.close()


async def test_sighup_applies_limits_timeouts_and_app_from_sidecar_yaml(tmp_path: Path) -> None:
    async with RecordingUpstream(named("one")) as one, RecordingUpstream(named("two")) as two:
        bootstrap: dict[str, Any] = {
            "service": "echo", "app": one.address,
            "listeners": {"outbound": "127.0.0.1:0", "admin": "127.0.0.1:0",
                          "inbound": {"address": "127.0.0.1:0", "tls": False}}}
        mesh = {"services": {"echo": {"endpoints": [one.address]}}}
        async with SidecarProcess(tmp_path, bootstrap=bootstrap, mesh=mesh) as sc:
            outbound, inbound = sc.ports["outbound"], sc.ports["inbound"]
            big = f"x-big: {'a' * 3000}\r\n"
            assert await get(outbound, "echo", big) == (200, b"one")
            assert await get(inbound, "echo") == (200, b"one")
            idle = await asyncio.open_connection("127.0.0.1", outbound)  # opened before the reload

            sc.write_config(bootstrap={**sc.bootstrap, "app": two.address,
                                       "limits": {"max_headers_size": "2KiB"},
                                       "timeouts": {"request_headers": "200ms"}})
            sc.send_signal(signal.SIGHUP)
            await sc.wait_for_event("reloaded")

            status, body = await get(outbound, "echo", big)
            assert status == 431, body  # the new limit
            assert await get(outbound, "echo") == (200, b"one")
            assert await get(inbound, "echo") == (200, b"two")  # the new app address
            # the new request-headers timeout: a head that never ends is answered 408 in time
            reader, writer = idle
            writer.write(b"GET / HTTP/1.1\r\nHost: echo\r\n")
            async with asyncio.timeout(2):
                status, _, _ = await read_response(reader)
            assert status == 408
            writer.close()
            shown = await config(sc)
            assert shown["bootstrap"]["limits"]["max_headers_size"] == 2048
            assert shown["restart_required"] == [] and not sc.events("restart_required")


async def test_sighup_with_a_new_listener_address_says_a_restart_is_needed(tmp_path: Path) -> None:
    async with RecordingUpstream(named("one")) as one:
        bootstrap: dict[str, Any] = {"service": "echo"}
        mesh = {"services": {"echo": {"endpoints": [one.address]}}}
        async with SidecarProcess(tmp_path, bootstrap=bootstrap, mesh=mesh) as sc:
            outbound = sc.ports["outbound"]
            bootstrap = {**sc.bootstrap, "listeners": {"outbound": "127.0.0.2:15099", "admin": "127.0.0.1:0"},
                         "limits": {"max_header_count": 5}}
            sc.write_config(bootstrap=bootstrap)
            sc.send_signal(signal.SIGHUP)
            await sc.wait_for_event("reloaded")

            change = "listeners.outbound: 127.0.0.1:0 -> 127.0.0.2:15099"
            assert sc.events("restart_required")[-1]["changes"] == [change]
            shown = await config(sc)
            assert shown["restart_required"] == [change]
            assert shown["bootstrap"]["listeners"][0]["address"] == ["127.0.0.1", 0]  # what runs
            assert shown["bootstrap"]["limits"]["max_header_count"] == 5  # what applied
            assert await get(outbound, "echo") == (200, b"one")  # still served where it was

            sc.write_config(bootstrap={**bootstrap, "listeners": {"outbound": "127.0.0.1:0", "admin": "127.0.0.1:0"}})
            sc.send_signal(signal.SIGHUP)
            await sc.wait_for_event("reloaded", count=2)
            assert (await config(sc))["restart_required"] == []  # reverted: nothing pending


async def test_sighup_with_a_bad_sidecar_yaml_keeps_the_running_config(tmp_path: Path) -> None:
    async with RecordingUpstream(named("one")) as one:
        bootstrap: dict[str, Any] = {"service": "echo"}
        mesh = {"services": {"echo": {"endpoints": [one.address]}}}
        async with SidecarProcess(tmp_path, bootstrap=bootstrap, mesh=mesh) as sc:
            outbound = sc.ports["outbound"]
            sc.write_config(bootstrap={**sc.bootstrap, "limits": {"max_headers_size": "small"}})
            sc.send_signal(signal.SIGHUP)
            rejected = (await sc.wait_for_event("reload_rejected"))[-1]
            assert rejected["source"] == str(sc.config_path)
            assert rejected["problems"][0].startswith("limits.max_headers_size: ")
            assert "'small'" in rejected["problems"][0]
            assert await get(outbound, "echo", f"x-big: {'a' * 3000}\r\n") == (200, b"one")
            assert (await config(sc))["bootstrap"]["limits"]["max_headers_size"] == 60 * 1024
            assert not sc.events("reloaded")


async def test_a_snapshot_whose_exchange_was_dropped_unfinished_is_still_retired(tmp_path: Path) -> None:
    """An exchange the connection dropped without finishing it (a framing error in the same
    read) never releases its hold: once nothing references the snapshot, its clusters go."""
    (tmp_path / "sidecar.yaml").write_text(yaml.safe_dump({
        "service": "client", "mesh": "mesh.yaml", "listeners": {"outbound": "127.0.0.1:0"}}))
    bootstrap = load_bootstrap(tmp_path / "sidecar.yaml")
    sidecar = Sidecar(bootstrap, parse_mesh({"services": {"a": {"endpoints": ["127.0.0.1:1"]}}}),
                      logs=LogOutputs())
    held = sidecar.snapshots.hold()  # as a parsed request does; never released
    pool = next(iter(held.clusters.pools.values()))
    await sidecar.apply(parse_mesh({"services": {"b": {"endpoints": ["127.0.0.1:1"]}}}))
    assert len(sidecar.clusters.retiring) == 1 and not pool.closed
    del held
    gc.collect()
    await asyncio.sleep(0)  # the finalizer hands the retirement to the loop
    assert not sidecar.clusters.retiring and pool.closed
    assert sidecar.clusters.live_pools() == 1
    await sidecar.clusters.close()
