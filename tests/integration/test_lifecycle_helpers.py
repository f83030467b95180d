"""The lifecycle helpers of issue 13, with real processes: ``pake-sidecar run -- APP`` (the app
starts once the sidecar is ready, gets forwarded signals, stops before the sidecar drains, and
its exit status is the process's), ``wait-ready``, and the admin's ``POST /drain`` and
``POST /shutdown``. The app is a tiny Python script that reports what it saw as JSON lines in a
file of its own (``$TEST_APP_LINES``, in the sidecar's directory): not on the stdout it shares
with the sidecar, whose buffered log writes its lines could interleave with."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.helpers.control_process import ControlProcess
from tests.helpers.sidecar_process import JoinedSidecarProcess, SidecarFailed, SidecarProcess
from tests.helpers.upstreams import RecordingUpstream
from tests.integration.test_lifecycle import Client, slow_app

_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 10.0
APP_LINES = "app-lines.jsonl"  # the test app's own lines, in the sidecar's directory

APP = r'''
import http.client, json, os, signal, sys, time

def get(address, path, host="admin"):
    h, _, p = address.rpartition(":")
    conn = http.client.HTTPConnection(h, int(p), timeout=5)
    try:
        conn.request("GET", path, headers={"host": host})
        return conn.getresponse().status
    except OSError as exc:
        return repr(exc)
    finally:
        conn.close()

def say(what, **extra):
    line = json.dumps({"event": "test_app", "what": what, **extra}) + "\n"
    with open(os.environ["TEST_APP_LINES"], "a") as f:  # one write per line, closed (flushed) each time
        f.write(line)

mode = sys.argv[1]
say("started", readyz=get(os.environ["PAKE_SIDECAR_ADMIN"], "/readyz"),
    call=get(os.environ["PAKE_SIDECAR_OUTBOUND"], "/orders", "orders"), pgid=os.getpgid(0))
if mode == "batch":
    sys.exit(int(sys.argv[2]))
if mode == "until":  # a batch job that ends when the test says (a file appears), status 0
    while not os.path.exists(sys.argv[2]):
        time.sleep(0.02)
    sys.exit(0)

def on_term(sig, frame):
    # still draining: the sidecar must carry this call
    say("SIGTERM", call=get(os.environ["PAKE_SIDECAR_OUTBOUND"], "/orders", "orders"))
    sys.exit(int(sys.argv[2]) if len(sys.argv) > 2 else 0)

signal.signal(signal.SIGUSR1, lambda sig, frame: say("SIGUSR1"))
signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "stubborn" else on_term)
say("serving")
while True:
    signal.pause()
'''


class RunProcess(SidecarProcess):
    """``pake-sidecar run -c sidecar.yaml <run_args>``: the helper's process, other arguments."""

    def __init__(self, *args: Any, run_args: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.run_args = run_args

    async def start(self) -> RunProcess:
        await start_with(self, self.run_args)
        return self


class JoinedRunProcess(JoinedSidecarProcess):
    def __init__(self, *args: Any, run_args: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.run_args = run_args

    async def start(self) -> JoinedRunProcess:
        await start_with(self, self.run_args)
        return self


async def start_with(sc: SidecarProcess, run_args: list[str]) -> None:
    """SidecarProcess.start with more arguments: waits for the ``ready`` line."""
    sc.write_config()
    # the sidecar passes its environment to the app: this is where the app writes its lines
    env = {**os.environ, "PYTHONPATH": str(_ROOT), "TEST_APP_LINES": str(sc.dir / APP_LINES)}
    sc.proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "run", "-c", str(sc.config_path), *run_args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=str(sc.dir), env=env,
        limit=1 << 20)
    sc._readers = [asyncio.create_task(sc._read(sc.proc.stdout, sc.lines)),
                   asyncio.create_task(sc._read(sc.proc.stderr, sc.stderr))]
    waiter = asyncio.create_task(sc._ready.wait())
    exited = asyncio.create_task(sc.proc.wait())
    await asyncio.wait({waiter, exited}, timeout=sc.ready_timeout, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    exited.cancel()
    if not sc._ready.is_set():
        await sc.stop()
        raise SidecarFailed(f"sidecar not ready: stderr={sc.stderr[-5:]} stdout={sc.lines[-5:]}")


def app_args(tmp_path: Path, *args: str) -> list[str]:
    script = tmp_path / "app.py"
    script.write_text(APP)
    return ["--", sys.executable, str(script), *args]


def static(tmp_path: Path, upstream: RecordingUpstream, run_args: list[str]) -> RunProcess:
    return RunProcess(tmp_path, bootstrap={"service": "web"},
                      mesh={"services": {"orders": {"endpoints": [upstream.address]}}},
                      run_args=run_args)


def order(sc: SidecarProcess, *names: str) -> list[str]:
    """The sidecar's log events among ``names``, in the order it logged them. (The app's own
    lines are in a file of their own: their order against the sidecar's is not kept.)"""
    return [line["event"] for line in sc.lines if isinstance(line, dict) and line.get("event") in names]


def app_events(sc: SidecarProcess) -> list[dict[str, Any]]:
    """The app's lines so far, in the order it wrote them (only complete lines; no file: none)."""
    try:
        text = (sc.dir / APP_LINES).read_text()
    except FileNotFoundError:
        return []
    complete = text[:text.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line.strip()]


async def wait_app_lines(sc: SidecarProcess, count: int, timeout: float = TIMEOUT) -> list[dict[str, Any]]:
    """Waits until the app has written at least ``count`` lines; returns them all."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(lines := app_events(sc)) < count:
        if loop.time() >= deadline:
            raise TimeoutError(f"{len(lines)} app lines after {timeout}s, wanted {count}: {lines}")
        await asyncio.sleep(0.02)
    return lines


def app_line(sc: SidecarProcess, what: str) -> dict[str, Any]:
    [line] = [e for e in app_events(sc) if e["what"] == what]
    return line


async def admin(sc: SidecarProcess, method: str, path: str, **kwargs: Any) -> tuple[int, dict[str, Any], Any]:
    async with aiohttp.ClientSession() as http, http.request(method, sc.admin + path, **kwargs) as r:
        return r.status, dict(r.headers), await r.json()


async def wait_ready(*args: str) -> asyncio.subprocess.Process:
    env = {**os.environ, "PYTHONPATH": str(_ROOT)}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "wait-ready", *args, cwd=str(_ROOT), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


# === run -- APP =================================================================================


async def test_a_batch_app_starts_once_ready_and_its_exit_status_is_the_processs(tmp_path: Path) -> None:
    async with RecordingUpstream() as upstream:
        sc = await static(tmp_path, upstream, app_args(tmp_path, "batch", "7")).start()
        try:
            assert await sc.wait(TIMEOUT) == 7
        finally:
            await sc.stop()
    started = app_line(sc, "started")
    # The app's very first calls find the sidecar ready and carrying traffic.
    assert (started["readyz"], started["call"]) == (200, 200)
    assert started["pgid"] != os.getpgid(0), "the app runs in a process group of its own"
    assert order(sc, "ready", "app_started", "app_exited", "draining", "stopped") == [
        "ready", "app_started", "app_exited", "draining", "stopped"]
    assert sc.events("app_exited")[0]["status"] == 7


async def test_sigterm_stops_the_app_first_while_the_sidecar_serves_then_drains_it(tmp_path: Path) -> None:
    async with RecordingUpstream() as upstream:
        sc = await static(tmp_path, upstream, app_args(tmp_path, "serve", "3")).start()
        try:
            await wait_app_lines(sc, 2)  # started, serving
            sc.send_signal(signal.SIGUSR1)
            await wait_app_lines(sc, 3)
            assert app_events(sc)[-1]["what"] == "SIGUSR1", "signals are forwarded"
            sc.send_signal(signal.SIGTERM)
            assert await sc.wait(TIMEOUT) == 3  # the app's status
        finally:
            await sc.stop()
    assert app_line(sc, "SIGTERM")["call"] == 200, "the sidecar still serves while the app stops"
    assert order(sc, "app_stopping", "app_exited", "draining", "stopped") == [
        "app_stopping", "app_exited", "draining", "stopped"]
    assert upstream.requests == 2


async def test_an_app_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    async with RecordingUpstream() as upstream:
        sc = await static(tmp_path, upstream,
                          ["--grace", "300ms", *app_args(tmp_path, "stubborn")]).start()
        try:
            await wait_app_lines(sc, 2)
            loop = asyncio.get_running_loop()
            sent = loop.time()
            sc.send_signal(signal.SIGTERM)
            assert await sc.wait(TIMEOUT) == 128 + signal.SIGKILL
            assert 0.3 <= loop.time() - sent < 5.0
        finally:
            await sc.stop()
    assert order(sc, "app_stopping", "app_grace_expired", "app_exited", "stopped") == [
        "app_stopping", "app_grace_expired", "app_exited", "stopped"]


async def test_post_shutdown_stops_the_app_then_the_sidecar(tmp_path: Path) -> None:
    async with RecordingUpstream() as upstream:
        sc = await static(tmp_path, upstream, app_args(tmp_path, "serve")).start()
        try:
            await wait_app_lines(sc, 2)
            status, _, body = await admin(sc, "POST", "/shutdown")
            assert status == 202 and body["exiting"] is True
            assert await sc.wait(TIMEOUT) == 0
        finally:
            await sc.stop()
    assert sc.events("app_stopping")[0]["reason"] == "shutdown"
    assert app_line(sc, "SIGTERM")["call"] == 200
    assert order(sc, "app_stopping", "app_exited", "draining") == ["app_stopping", "app_exited", "draining"]


async def test_an_app_that_cannot_start_exits_127_with_one_line(tmp_path: Path) -> None:
    async with RecordingUpstream() as upstream:
        sc = await static(tmp_path, upstream, ["--", str(tmp_path / "no-such-app")]).start()
        try:
            assert await sc.wait(TIMEOUT) == 127
        finally:
            await sc.stop()
    assert sc.stderr == [f"pake-sidecar: cannot start the app '{tmp_path / 'no-such-app'}': "
                         "No such file or directory"]
    assert sc.events("stopped")


# === a joined sidecar: run and wait-ready wait for the config ====================================


async def test_run_and_wait_ready_wait_until_the_control_plane_gives_a_config(tmp_path: Path) -> None:
    async with RecordingUpstream() as upstream, ControlProcess(tmp_path / "control") as cp:
        sc = JoinedRunProcess(tmp_path, service="web", addresses=[cp.listen], token=await cp.token("web"),
                              listeners={"outbound": "127.0.0.1:0", "admin": "127.0.0.1:0"},
                              run_args=app_args(tmp_path, "until", str(tmp_path / "done")))
        await sc.start()  # listening (joined, holding a certificate): no config yet
        probe: asyncio.subprocess.Process | None = None
        try:
            probe = await wait_ready("--admin", f"127.0.0.1:{sc.ports['admin']}", "--timeout", "20s")
            status, _, ready = await admin(sc, "GET", "/readyz")
            assert (status, ready["config"]) == (503, False)
            # a wait-ready that gives up says why
            quick = await wait_ready("--admin", f"127.0.0.1:{sc.ports['admin']}", "--timeout", "200ms")
            _, err = await quick.communicate()
            assert quick.returncode == 1
            assert "not ready after 0.2s: no config yet" in err.decode()
            assert not sc.events("app_started") and probe.returncode is None

            mesh = tmp_path / "mesh.yaml"
            mesh.write_text(yaml.safe_dump({"services": {"web": {},
                                                         "orders": {"endpoints": [upstream.address]}}}))
            applied = await cp.pakectl("apply", "-f", str(mesh))
            assert applied.code == 0, applied.stderr
            async with asyncio.timeout(TIMEOUT):
                assert await probe.wait() == 0
            # (the job ends only now: had it ended at once, the sidecar could have drained
            # and gone between two of wait-ready's polls)
            await wait_app_lines(sc, 1)  # its "started" line, written before it ends
            (tmp_path / "done").touch()
            assert await sc.wait(TIMEOUT) == 0  # the batch app ran and exited 0
        finally:
            if probe is not None and probe.returncode is None:
                probe.kill()
                await probe.wait()
            await sc.stop()
    assert app_line(sc, "started")["readyz"] == 200
    assert order(sc, "config_applied", "app_started") == ["config_applied", "app_started"]


# === POST /drain, POST /shutdown ================================================================


async def test_post_drain_stops_taking_work_finishes_in_flight_and_keeps_the_process(tmp_path: Path) -> None:
    release = asyncio.Event()
    async with slow_app(release) as (app, arrived):
        sc = SidecarProcess(tmp_path, bootstrap={"service": "echo"},
                            mesh={"services": {"echo": {"endpoints": [f"127.0.0.1:{app.port}"]}}})
        await sc.start()
        try:
            port = sc.ports["outbound"]
            busy = await Client.open(port)
            in_flight = asyncio.ensure_future(busy.get("/slow"))
            await asyncio.wait_for(arrived.wait(), TIMEOUT)

            # Mutations only by POST, never from a web page.
            status, headers, body = await admin(sc, "GET", "/drain")
            assert (status, body["error"], headers["Allow"]) == (405, "method_not_allowed", "POST")
            assert (await admin(sc, "GET", "/shutdown"))[0] == 405
            assert (await admin(sc, "POST", "/readyz"))[0] == 405
            status, _, body = await admin(sc, "POST", "/shutdown", headers={"origin": "http://evil.example"})
            assert (status, body["error"]) == (403, "forbidden")
            assert (await admin(sc, "GET", "/readyz"))[0] == 200, "a refused mutation changed nothing"

            status, _, body = await admin(sc, "POST", "/drain")
            assert (status, body["draining"]) == (202, True)
            await sc.wait_for_event("draining")
            status, _, ready = await admin(sc, "GET", "/readyz")
            assert (status, ready["draining"]) == (503, True)
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection("127.0.0.1", port)
            probe = await wait_ready("--admin", f"127.0.0.1:{sc.ports['admin']}", "--timeout", "200ms")
            _, err = await probe.communicate()
            assert probe.returncode == 1 and err.decode().rstrip().endswith("not ready after 0.2s: draining")

            release.set()
            status, _, reply = await in_flight
            assert (status, reply) == (200, b"finished")
            await sc.wait_for_event("drained")
            # drained, and still up: admin answers until a shutdown
            assert (await admin(sc, "GET", "/healthz"))[0] == 200
            assert sc.proc is not None and sc.proc.returncode is None
            assert (await admin(sc, "POST", "/drain"))[0] == 202, "a second drain is harmless"
            assert (await admin(sc, "POST", "/shutdown"))[0] == 202
            assert await sc.wait(TIMEOUT) == 0
            assert len(sc.events("draining")) == 1 and sc.events("stopped")
            busy.close()
        finally:
            await sc.stop()


async def test_wait_ready_with_the_config_file_exits_0_for_a_ready_sidecar(tmp_path: Path) -> None:
    sc = SidecarProcess(tmp_path, bootstrap={"service": "echo"},
                        mesh={"services": {"echo": {"endpoints": ["127.0.0.1:9"]}}})
    async with sc:
        # a sidecar.yaml naming the admin port the sidecar bound
        config = tmp_path / "probe.yaml"
        config.write_text(yaml.safe_dump({**sc.bootstrap, "mesh": str(sc.dir / "mesh.yaml"), "listeners": {
            "outbound": "127.0.0.1:0", "admin": f"127.0.0.1:{sc.ports['admin']}"}}))
        probe = await wait_ready("-c", str(config), "--timeout", "5s")
        out, err = await probe.communicate()
        assert (probe.returncode, out, err) == (0, b"", b"")
