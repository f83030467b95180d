"""A real ``pake-sidecar`` process for tests: config written from dicts, every port 0.

``async with SidecarProcess(tmp_path, bootstrap={...}, mesh={...}) as sc:`` starts the
process, waits for its ``ready`` log line (never a sleep) and exposes the ports it bound;
leaving the block sends SIGTERM and waits for exit. Every stdout/stderr line is kept in
``sc.lines`` (JSON-decoded where possible) for log assertions.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import yaml

__all__ = ["SidecarProcess", "SidecarFailed", "decode_line"]

_ROOT = Path(__file__).resolve().parents[2]


def decode_line(line: bytes) -> Any:
    """One line a process printed: its JSON object when it is one, else the text."""
    text = line.decode(errors="replace").rstrip("\n")
    try:
        return json.loads(text)
    except ValueError:
        return text


class SidecarFailed(Exception):
    pass


class SidecarProcess:
    def __init__(self, workdir: Path, *, bootstrap: dict[str, Any], mesh: dict[str, Any] | None,
                 name: str = "sidecar", ready_timeout: float = 15.0,
                 env: dict[str, str] | None = None) -> None:
        self.dir = workdir / name
        self.env = env or {}  # over the test's own environment (PYTHONPATH: the repository)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.bootstrap = {"mesh": "mesh.yaml", **bootstrap}
        self.bootstrap.setdefault("listeners", {"outbound": "127.0.0.1:0", "admin": "127.0.0.1:0"})
        self.mesh = mesh
        self.ready_timeout = ready_timeout
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[dict[str, Any] | str] = []
        self.stderr: list[str] = []
        self.ports: dict[str, int] = {}
        self._ready = asyncio.Event()
        self._readers: list[asyncio.Task[None]] = []
        self._new_line = asyncio.Event()

    @property
    def config_path(self) -> Path:
        return self.dir / "sidecar.yaml"

    def write_config(self, *, bootstrap: dict[str, Any] | None = None, mesh: dict[str, Any] | str | None = None) -> None:
        if bootstrap is not None:
            self.bootstrap = bootstrap
        self.config_path.write_text(yaml.safe_dump(self.bootstrap))
        value = self.mesh if mesh is None else mesh
        if value is not None:
            (self.dir / "mesh.yaml").write_text(value if isinstance(value, str) else yaml.safe_dump(value))

    async def start(self) -> SidecarProcess:
        self.write_config()
        env = {**os.environ, "PYTHONPATH": str(_ROOT), **self.env}
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sidecar", "run", "-c", str(self.config_path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=str(self.dir), env=env,
            limit=1 << 20)
        self._readers = [asyncio.create_task(self._read(self.proc.stdout, self.lines)),
                         asyncio.create_task(self._read(self.proc.stderr, self.stderr))]
        waiter = asyncio.create_task(self._ready.wait())
        exited = asyncio.create_task(self.proc.wait())
        done, _ = await asyncio.wait({waiter, exited}, timeout=self.ready_timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        exited.cancel()
        if not self._ready.is_set():
            await self.stop()
            raise SidecarFailed(f"sidecar not ready: stderr={self.stderr[-5:]} stdout={self.lines[-5:]}")
        return self

    async def _read(self, stream: asyncio.StreamReader | None, sink: list[Any]) -> None:
        assert stream is not None
        while line := await stream.readline():
            item = decode_line(line)
            sink.append(item)
            if isinstance(item, dict) and item.get("event") == "ready":
                self.ports = dict(item["ports"])
                self._ready.set()
            self._new_line.set()

    def url(self, listener: str = "outbound") -> str:
        return f"http://127.0.0.1:{self.ports[listener]}"

    @property
    def admin(self) -> str:
        return self.url("admin")

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if isinstance(line, dict) and line.get("event") == name]

    async def wait_for_event(self, name: str, timeout: float = 10.0, count: int = 1,
                             where: Callable[[dict[str, Any]], bool] | None = None) -> list[dict[str, Any]]:
        """Wait until at least ``count`` log lines with ``event == name`` (and, with ``where``,
        for which it holds) were printed; those lines. A sidecar writes its log lines from a
        thread that gathers them for up to 50 ms under load: an access line can come after
        its response, so a test waits for the one it needs."""
        def matching() -> list[dict[str, Any]]:
            return [e for e in self.events(name) if where is None or where(e)]

        async with asyncio.timeout(timeout):
            while len(matching()) < count:
                self._new_line.clear()
                await self._new_line.wait()
        return matching()

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
        for reader in self._readers:
            try:
                async with asyncio.timeout(2):
                    await reader
            except TimeoutError:
                reader.cancel()
        return code

    async def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return await self.wait(timeout)
            except TimeoutError:
                self.proc.kill()
                return await self.wait(5)
        return await self.wait(5)

    async def __aenter__(self) -> SidecarProcess:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class JoinedSidecarProcess(SidecarProcess):
    """A sidecar whose bootstrap has ``control:`` instead of ``mesh:`` and ``tls:``.

    The join token (if given) is written to ``join.token`` beside ``sidecar.yaml``; the state
    directory is ``state/`` there, so a restart of the same object finds its identity and last
    snapshot. ``ready`` is logged once the listeners are bound (after the join); a test waits
    for ``config_applied`` (or the admin ``/readyz``) for the first config.
    """

    def __init__(self, workdir: Path, *, service: str, addresses: list[str], token: str | None,
                 listeners: dict[str, Any], app: str | None = None, name: str | None = None,
                 extra: dict[str, Any] | None = None, ready_timeout: float = 20.0) -> None:
        control = {"addresses": addresses, "token_file": "join.token", "state_dir": "state",
                   "reconnect_max": "500ms"}
        bootstrap: dict[str, Any] = {"service": service, "listeners": listeners, "control": control,
                                     **(extra or {})}
        if app is not None:
            bootstrap["app"] = app
        super().__init__(workdir, bootstrap=bootstrap, mesh=None, name=name or f"{service}-sidecar",
                         ready_timeout=ready_timeout)
        self.bootstrap = bootstrap  # no mesh: key
        self.token = token

    @property
    def state_dir(self) -> Path:
        return self.dir / "state"

    async def start(self) -> JoinedSidecarProcess:
        await super().start()
        return self

    def write_config(self, *, bootstrap: dict[str, Any] | None = None, mesh: dict[str, Any] | str | None = None) -> None:
        super().write_config(bootstrap=bootstrap, mesh=mesh)
        if self.token is not None:
            (self.dir / "join.token").write_text(self.token + "\n")

    async def wait_config(self, version_prefix: str = "", timeout: float = 10.0) -> dict[str, Any]:
        """The ``config_applied`` log line of a version starting with ``version_prefix``."""
        async with asyncio.timeout(timeout):
            while True:
                for event in self.events("config_applied"):
                    if str(event.get("version", "")).startswith(version_prefix):
                        return event
                self._new_line.clear()
                await self._new_line.wait()

    async def wait_endpoints(self, cluster: str, count: int = 1, timeout: float = 10.0) -> list[str]:
        """Wait until the config it serves gives ``cluster`` at least ``count`` endpoints.

        ``config_applied`` is not enough before traffic: a service's sidecar registers when
        its stream opens, after ``ready``, so a config applied meanwhile reaches the callers
        first without that endpoint and the next push brings it (503 UH in between, which is
        right for a service with no endpoint yet). Returns the addresses."""
        addresses: list[str] = []
        async with asyncio.timeout(timeout), aiohttp.ClientSession() as http:
            while True:
                async with http.get(self.admin + "/clusters") as r:
                    clusters = (await r.json())["clusters"]
                addresses = [e["address"] for c in clusters if c["name"] == cluster
                             for e in c["endpoints"]]
                if len(addresses) >= count:
                    return addresses
                await asyncio.sleep(0.05)
