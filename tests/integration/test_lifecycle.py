"""The sidecar process's life as an operator sees it (issue 2): drain on SIGTERM, reload on
SIGHUP (good and bad files), and the messages that stop a bad start-up."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.helpers.sidecar_process import SidecarFailed, SidecarProcess
from tests.helpers.upstreams import RecordingUpstream

TIMEOUT = 10.0
ROOT = Path(__file__).resolve().parents[2]


# === helpers ====================================================================================


class Client:
    """One raw keep-alive downstream connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Client:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def get(self, path: str, host: str = "echo") -> tuple[int, dict[str, str], bytes]:
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        async with asyncio.timeout(TIMEOUT):
            head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            status_line, *lines = head.strip().split("\r\n")
            headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
            body = await self.reader.readexactly(int(headers["content-length"]))
        return int(status_line.split()[1]), headers, body

    async def closed(self) -> bool:
        """The sidecar closed this connection (EOF or reset, with nothing more sent)."""
        async with asyncio.timeout(TIMEOUT):
            try:
                return await self.reader.read() == b""
            except ConnectionResetError:
                return True

    def close(self) -> None:
        self.writer.close()


async def readyz(sc: SidecarProcess) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(sc.admin + "/readyz") as resp:
        return resp.status, await resp.json()


@asynccontextmanager
async def slow_app(release: asyncio.Event) -> AsyncIterator[tuple[TestServer, asyncio.Event]]:
    """An app whose ``/slow`` answers only once ``release`` is set; ``arrived`` tells when a
    request is waiting there."""
    arrived = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        arrived.set()
        await release.wait()
        return web.Response(text="finished")

    async def fast(request: web.Request) -> web.Response:
        return web.Response(text="fast")

    app = web.Application()
    app.router.add_get("/slow", slow)
    app.router.add_get("/{tail:.*}", fast)
    try:
        async with TestServer(app, host="127.0.0.1", port=0) as server:
            yield server, arrived
    finally:
        release.set()


# === SIGTERM: drain ===========================================================================


async def test_sigterm_drains_in_flight_requests_and_exits_0(tmp_path: Path) -> None:
    release = asyncio.Event()
    async with slow_app(release) as (app, arrived):
        sc = SidecarProcess(tmp_path, bootstrap={"service": "echo"},
                            mesh={"services": {"echo": {"endpoints": [f"127.0.0.1:{app.port}"]}}})
        await sc.start()
        try:
            port = sc.ports["outbound"]
            idle = await Client.open(port)
            assert (await idle.get("/warm"))[0] == 200  # now an idle keep-alive connection
            busy = await Client.open(port)
            in_flight = asyncio.ensure_future(busy.get("/slow"))
            await asyncio.wait_for(arrived.wait(), TIMEOUT)

            sc.send_signal(signal.SIGTERM)
            await sc.wait_for_event("draining")
            status, ready = await readyz(sc)
            assert status == 503 and ready["ready"] is False and ready["draining"] is True
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection("127.0.0.1", port)
            assert await idle.closed(), "an idle connection is closed at once"
            assert not in_flight.done() and sc.proc is not None and sc.proc.returncode is None

            release.set()
            status, headers, body = await in_flight
            assert (status, body) == (200, b"finished")
            assert headers["connection"] == "close", "a draining sidecar ends keep-alive"
            assert await sc.wait() == 0
            assert sc.events("stopped") and not sc.events("drain_deadline")
            assert [a["status"] for a in sc.events("access") if a["path"] == "/slow"] == [200]
            idle.close()
            busy.close()
        finally:
            await sc.stop()


async def test_drain_deadline_cuts_what_is_left_and_still_exits_0(tmp_path: Path) -> None:
    release = asyncio.Event()
    async with slow_app(release) as (app, arrived):
        async with SidecarProcess(tmp_path, bootstrap={"service": "echo", "timeouts": {"drain": "300ms"}},
                                  mesh={"services": {"echo": {"endpoints": [f"127.0.0.1:{app.port}"]}}}) as sc:
            busy = await Client.open(sc.ports["outbound"])
            in_flight = asyncio.ensure_future(busy.get("/slow"))
            await asyncio.wait_for(arrived.wait(), TIMEOUT)
            sc.send_signal(signal.SIGTERM)
            assert await sc.wait() == 0
            with pytest.raises((asyncio.IncompleteReadError, ConnectionResetError)):
                await in_flight  # cut: the request outlived the drain deadline
            busy.close()
            assert sc.events("drain_deadline") and sc.events("stopped")


# === SIGHUP: reload ===========================================================================


async def test_sighup_with_a_valid_mesh_swaps_the_snapshot_and_keeps_connections(tmp_path: Path) -> None:
    async with RecordingUpstream() as one, \
            RecordingUpstream(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\ntwo") as two:
        mesh: dict[str, Any] = {"services": {"echo": {"endpoints": [one.address]}}}
        async with SidecarProcess(tmp_path, bootstrap={"service": "echo"}, mesh=mesh) as sc:
            _, before = await readyz(sc)
            client = await Client.open(sc.ports["outbound"])
            assert (await client.get("/before"))[0::2] == (200, b"ok")
            assert (await client.get("/", host="two"))[0] == 404

            mesh["services"]["two"] = {"endpoints": [two.address]}
            sc.write_config(mesh=mesh)
            sc.send_signal(signal.SIGHUP)
            reloaded = (await sc.wait_for_event("reloaded"))[-1]

            # the same downstream connection, the new routes; the old pool kept its connection
            assert (await client.get("/after", host="two"))[0::2] == (200, b"two")
            assert (await client.get("/after"))[0::2] == (200, b"ok")
            assert one.connections == 1
            _, after = await readyz(sc)
            assert after["version"] == reloaded["version"] != before["version"]
            client.close()


async def test_sighup_with_an_invalid_mesh_keeps_the_old_snapshot(tmp_path: Path) -> None:
    async with RecordingUpstream() as upstream:
        mesh: dict[str, Any] = {"services": {"echo": {"endpoints": [upstream.address]}}}
        async with SidecarProcess(tmp_path, bootstrap={"service": "echo"}, mesh=mesh) as sc:
            _, before = await readyz(sc)
            client = await Client.open(sc.ports["outbound"])
            assert (await client.get("/before"))[0] == 200

            mesh["services"]["echo"]["timeouts"] = {"route": "10"}
            mesh["services"]["two"] = {"endpoints": [upstream.address]}
            sc.write_config(mesh=mesh)
            sc.send_signal(signal.SIGHUP)
            rejected = (await sc.wait_for_event("reload_rejected"))[-1]
            assert rejected["source"] == str(sc.dir / "mesh.yaml")
            assert len(rejected["problems"]) == 1
            assert re.fullmatch(r"services\.echo\.timeouts\.route: must be a duration .*, got '10'",
                                rejected["problems"][0]), rejected["problems"]
            assert rejected["keeping"] == before["version"]

            sc.write_config(mesh="services:\n  echo: {endpoints: [127.0.0.1:1\n")
            sc.send_signal(signal.SIGHUP)
            rejected = (await sc.wait_for_event("reload_rejected", count=2))[-1]
            assert re.match(r"line \d+: invalid YAML", rejected["problems"][0]), rejected["problems"]

            # the old routes serve on, on the same connection: "two" was never added
            assert (await client.get("/still"))[0] == 200
            assert (await client.get("/", host="two"))[0] == 404
            assert (await readyz(sc))[1]["version"] == before["version"]
            assert not sc.events("reloaded")
            client.close()


# === start-up errors ============================================================================


async def failed_start(sc: SidecarProcess) -> tuple[int, list[str]]:
    """Start ``sc`` expecting it to exit; returns its exit status and stderr lines."""
    with pytest.raises(SidecarFailed):
        await sc.start()
    assert sc.proc is not None and sc.proc.returncode is not None
    assert not any("Traceback" in line for line in sc.stderr), sc.stderr
    return sc.proc.returncode, sc.stderr


async def test_bad_values_stop_start_up_with_one_line_each(tmp_path: Path) -> None:
    sc = SidecarProcess(tmp_path, bootstrap={"service": "echo"}, mesh={"services": {"echo": {
        "endpoints": ["127.0.0.1:1"], "timeouts": {"route": "10", "connect": "fast"}}}})
    code, stderr = await failed_start(sc)
    prefix = f"pake-sidecar: {sc.dir / 'mesh.yaml'}: "
    assert code == 2
    assert len(stderr) == 2, stderr
    assert stderr[0].startswith(prefix + "services.echo.timeouts.route: must be a duration")
    assert stderr[0].endswith("got '10'")
    assert stderr[1].startswith(prefix + "services.echo.timeouts.connect: must be a duration")
    assert stderr[1].endswith("got 'fast'")


async def test_unknown_keys_stop_start_up(tmp_path: Path) -> None:
    sc = SidecarProcess(tmp_path, bootstrap={"service": "echo"},
                        mesh={"services": {"echo": {"endpoints": ["127.0.0.1:1"], "colour": "blue"}}})
    code, stderr = await failed_start(sc)
    assert (code, stderr) == (2, [f"pake-sidecar: {sc.dir / 'mesh.yaml'}: services.echo.colour: unknown key"])

    sc = SidecarProcess(tmp_path, name="typo", bootstrap={"service": "echo", "listners": {}}, mesh={})
    code, stderr = await failed_start(sc)
    assert (code, stderr) == (2, [f"pake-sidecar: {sc.config_path}: listners: unknown key"])


async def test_a_missing_file_stops_start_up(tmp_path: Path) -> None:
    sc = SidecarProcess(tmp_path, bootstrap={"service": "echo", "mesh": "missing.yaml"}, mesh=None)
    code, stderr = await failed_start(sc)
    assert (code, stderr) == (2, [f"pake-sidecar: {sc.dir / 'missing.yaml'}: file not found"])

    missing = tmp_path / "no-such-sidecar.yaml"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "run", "-c", str(missing), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    async with asyncio.timeout(TIMEOUT):
        out, err = await proc.communicate()
    assert proc.returncode == 2 and out == b""
    assert err.decode().splitlines() == [f"pake-sidecar: {missing}: file not found"]


async def test_invalid_yaml_is_reported_with_its_line(tmp_path: Path) -> None:
    sc = SidecarProcess(tmp_path, bootstrap={"service": "echo"}, mesh=None)
    sc.write_config(mesh="trust_domain: pake.local\nservices:\n  echo:\n    endpoints: [127.0.0.1:1\n")
    code, stderr = await failed_start(sc)
    assert code == 2 and len(stderr) == 1, stderr
    assert re.fullmatch(rf"pake-sidecar: {re.escape(str(sc.dir / 'mesh.yaml'))}: line [45]: invalid YAML: .+",
                        stderr[0]), stderr


async def test_a_listener_port_in_use_stops_start_up_with_exit_1(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        sc = SidecarProcess(tmp_path, bootstrap={"service": "echo", "listeners": {
            "outbound": f"127.0.0.1:{port}", "admin": "127.0.0.1:0"}},
            mesh={"services": {"echo": {"endpoints": ["127.0.0.1:1"]}}})
        code, stderr = await failed_start(sc)
    assert code == 1 and len(stderr) == 1, stderr
    assert stderr[0].startswith("pake-sidecar: cannot start: ")
    assert str(port) in stderr[0] and "address already in use" in stderr[0].lower()
