"""The demo's process supervisor: start a control plane, its sidecars and apps; stop them all.

Used by ``examples.demo`` (``make demo``) and ``examples.pake.tour`` (``make demo-tour``).
Rules: every child runs in a session of its own (Ctrl-C reaches only the demo, which stops
the mesh in order), its output goes to ours prefixed with its name, and it counts as
started only once it printed the line that says so (no fixed sleeps). Stopping is SIGTERM
(a sidecar drains), a bounded wait, then SIGKILL to the child's whole process group, so
nothing is left behind. The control plane is spoken to through its admin API with aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp

__all__ = ["Child", "ControlPlane", "DemoError", "Stopped", "identity_usable", "json_event",
           "shift_address", "until"]

ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT = 30.0  # per process: a cold Python start on a busy 2-core machine
STOP_TIMEOUT = 25.0  # a sidecar's drain deadline (20 s by default) and a margin
TAIL = 20  # lines kept per child for a start-up error


class DemoError(Exception):
    """A process did not start, or the mesh did not come up; the message says what."""


class Stopped(Exception):
    """Ctrl-C (or SIGTERM) while the mesh was still starting."""


def json_event(line: str) -> dict[str, Any] | None:
    """A JSON log line as a dict, or None."""
    if not line.startswith("{"):
        return None
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def shift_address(host_port: str, shift: int | None) -> str:
    """``host:port`` with the port moved by ``shift``, or 0 (any) when shift is None."""
    host, _, port = host_port.rpartition(":")
    return f"{host}:{0 if shift is None else int(port) + shift}"


Ready = Callable[[str], dict[str, int] | None]
LineHook = Callable[[str, str], None]


class Child:
    """One subprocess: its output goes to ours, prefixed with its name (unless ``quiet``),
    every line is offered to ``on_line``, and a line that ``ready(line)`` recognises
    resolves ``ports``."""

    def __init__(self, name: str, argv: list[str], ready: Ready, *, quiet: bool = False,
                 on_line: LineHook | None = None, log: Path | None = None,
                 pass_fds: tuple[int, ...] = ()) -> None:
        self.name = name
        self.argv = argv
        self.quiet = quiet
        self.log_path = log
        self.pass_fds = pass_fds
        self._log: Any = None
        self._ready = ready
        self._on_line = on_line
        self.proc: asyncio.subprocess.Process | None = None
        self.ports: dict[str, int] = {}
        self.tail: list[str] = []
        self._ready_event = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    async def start(self, cwd: Path) -> Child:
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        if self.log_path is not None:
            # Line-buffered text: a write is a memcpy into the buffer and one small write(2)
            # to a local file; the demo's own loop has nothing latency-critical to protect.
            self._log = open(self.log_path, "w", buffering=1)  # noqa: SIM115 - closed in stop()
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE, pass_fds=self.pass_fds,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True, limit=1 << 20)
        print(f"[demo] started {self.name} (pid {self.proc.pid})", flush=True)
        self._pump = asyncio.create_task(self._read())
        waiter = asyncio.create_task(self._ready_event.wait())
        exited = asyncio.create_task(self.proc.wait())
        try:
            await asyncio.wait({waiter, exited}, timeout=READY_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            exited.cancel()
        if not self._ready_event.is_set():
            if self.proc.returncode is not None:  # its last words are still in the pipe
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2):
                        await self._pump
                why = f"exited with status {self.proc.returncode}"
            else:
                why = f"did not become ready within {READY_TIMEOUT}s"
            last = "\n  ".join(self.tail[-8:]) or "(no output)"
            if self.log_path is not None:
                last += f"\n  (all of it: {self.log_path})"
            raise DemoError(f"{self.name} {why} (a port in use? try --ports-offset N):\n  {last}")
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            text = line.decode(errors="replace").rstrip()
            self.tail = [*self.tail[-(TAIL - 1):], text]
            if not self.quiet:
                print(f"[{self.name}] {text}", flush=True)
            if self._log is not None:
                self._log.write(text + "\n")
            if self._on_line is not None:
                self._on_line(self.name, text)
            if not self._ready_event.is_set():
                ports = self._ready(text)
                if ports is not None:
                    self.ports = ports
                    self._ready_event.set()

    async def stop(self) -> int | None:
        """SIGTERM, wait (a sidecar drains first), then SIGKILL its process group."""
        proc = self.proc
        if proc is None:
            return None
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(STOP_TIMEOUT):
                    await proc.wait()
            except TimeoutError:
                print(f"[demo] {self.name} did not stop in {STOP_TIMEOUT}s: killing it", flush=True)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        # Anything it started itself (it leads its own session) goes with it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if self._pump is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self._pump
        if self._log is not None:
            self._log.close()
            self._log = None
        print(f"[demo] {self.name} exited ({proc.returncode})", flush=True)
        return proc.returncode


def sidecar_ready(line: str) -> dict[str, int] | None:
    """A sidecar's ``ready`` line: the ports it bound."""
    event = json_event(line)
    if event is not None and event.get("event") == "ready":
        return {str(k): int(v) for k, v in event["ports"].items()}
    return None


def serving_ready(line: str) -> dict[str, int] | None:
    """``pakectl serve``'s ``serving`` line: the ports it bound (listen, admin, otlp)."""
    event = json_event(line)
    if event is not None and event.get("event") == "serving":
        return {str(k): int(v) for k, v in event["ports"].items()}
    return None


_LISTENING = re.compile(r"app (\S+) listening on http://[\d.]+:(\d+)")


def apps_ready(names: set[str]) -> Ready:
    """The apps process prints ``app NAME listening on http://127.0.0.1:PORT`` per app; ready
    once every name in ``names`` did."""
    seen: dict[str, int] = {}

    def ready(line: str) -> dict[str, int] | None:
        match = _LISTENING.search(line)
        if match:
            seen[match.group(1)] = int(match.group(2))
        return dict(seen) if names <= seen.keys() else None

    return ready


async def until(starting: Awaitable[Any], stop: asyncio.Event) -> Any:
    """Wait for ``starting``, unless Ctrl-C comes first (then ``Stopped``)."""
    start = asyncio.ensure_future(starting)
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({start, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not start.done():
        start.cancel()
        with contextlib.suppress(asyncio.CancelledError, DemoError):
            await start
        raise Stopped()
    return start.result()


def identity_usable(state_dir: Path, margin: timedelta = timedelta(minutes=10)) -> bool:
    """Does the sidecar state directory hold an identity that is still good for a while?
    (A demo restarted a day later: its 24 h certificates have expired, and an expired
    certificate cannot open the stream to renew itself; the sidecar then joins again.)"""
    from certs.memory_source import material_from_pem
    from certs.pem import PemError
    from sidecar.discovery.state import StateDir, StateError

    state = StateDir(state_dir)
    try:
        held = state.load_identity()
        if held is None:
            return False
        material = material_from_pem(held, state.files, now=datetime.now(UTC) + margin)
    except (StateError, PemError, OSError):
        return False
    return material is not None


@dataclass
class ControlPlane:
    """The admin API of a running ``pakectl serve`` (loopback: no admin token needed)."""

    admin: str  # host:port
    http: aiohttp.ClientSession

    async def _call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.http.request(method, f"http://{self.admin}{path}", json=body,
                                     timeout=aiohttp.ClientTimeout(total=30)) as resp:
            return resp.status, await resp.json(content_type=None)

    async def token(self, service: str, ttl: float = 600.0) -> str:
        status, body = await self._call("POST", "/v1/tokens", {"service": service, "ttl": ttl,
                                                               "uses": 1, "by": "make demo"})
        if status != 200:
            raise DemoError(f"pakectl token create --service {service}: HTTP {status}: {body}")
        return str(body["token"])

    async def apply(self, mesh: dict[str, Any]) -> tuple[int, bool]:
        """Apply ``mesh`` unless it is what already runs: (the running version, applied now?)."""
        status, current = await self._call("GET", "/v1/config")
        if status == 200 and current.get("mesh") == mesh:
            return int(current["version"]), False
        status, body = await self._call("POST", "/v1/config", {"mesh": mesh, "by": "make demo"})
        if status != 200:
            detail = "\n  ".join(body.get("errors", [])) if isinstance(body, dict) else body
            raise DemoError(f"pakectl apply: HTTP {status}: {detail}")
        return int(body["version"]), True

    async def status(self) -> dict[str, Any]:
        status, body = await self._call("GET", "/v1/status")
        if status != 200:
            raise DemoError(f"pakectl status: HTTP {status}: {body}")
        return dict(body)

    async def converged(self, nodes: dict[str, str], timeout: float = 30.0) -> None:
        """Wait until each sidecar of ``nodes`` (service -> node id) is connected and holds
        its latest snapshot (the stream pushes; the admin API has no watch, so look twice
        a second)."""
        waiting: list[str] = []
        try:
            async with asyncio.timeout(timeout):
                while True:
                    body = await self.status()
                    held = {(s["service"], s["node"]): s for s in body["sidecars"]}
                    waiting = [f"{svc}/{node} ({held[(svc, node)]['state'] if (svc, node) in held else 'not registered'})"
                               for svc, node in nodes.items()
                               if held.get((svc, node), {}).get("state") != "acked"]
                    if not waiting:
                        return
                    await asyncio.sleep(0.5)
        except TimeoutError:
            raise DemoError(f"the mesh did not converge in {timeout:g}s: waiting for "
                            + ", ".join(waiting)) from None

    async def rotate(self, timeout: float = 30.0) -> dict[str, Any]:
        """``pakectl certs rotate``: the final NDJSON item."""
        final: dict[str, Any] = {}
        async with self.http.post(f"http://{self.admin}/v1/certs/rotate", json={"timeout": timeout},
                                  timeout=aiohttp.ClientTimeout(total=timeout + 10)) as resp:
            if resp.status != 200:
                raise DemoError(f"pakectl certs rotate: HTTP {resp.status}: {await resp.text()}")
            async for raw in resp.content:
                item = json_event(raw.decode().strip())
                if item is not None and item.get("event") == "done":
                    final = item
        return final


def python(*args: str) -> list[str]:
    return [sys.executable, *args]
