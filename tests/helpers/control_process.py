"""A real ``pakectl serve`` process for tests: ports 0, waits for its ``serving`` log line.

``async with ControlProcess(state_dir) as cp:`` starts it and exposes ``cp.listen`` and
``cp.admin`` (host:port); ``await cp.pakectl("status", "--json")`` runs the CLI against it
(``--admin`` filled in); every stdout line is kept (JSON-decoded) for ``wait_for_event``.
Leaving the block sends SIGTERM and waits for the exit.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers.sidecar_process import decode_line

__all__ = ["CliResult", "ControlFailed", "ControlProcess", "run_pakectl"]

_ROOT = Path(__file__).resolve().parents[2]
_ADMIN_COMMANDS = {"token", "apply", "history", "rollback", "get", "status", "check", "certs"}


class ControlFailed(Exception):
    pass


@dataclass(frozen=True, slots=True)
class CliResult:
    code: int
    stdout: str
    stderr: str


async def run_pakectl(*args: str, timeout: float = 30.0) -> CliResult:
    env = {**os.environ, "PYTHONPATH": str(_ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "control", *args, cwd=str(_ROOT), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(timeout):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return CliResult(proc.returncode, out.decode(), err.decode())


class ControlProcess:
    def __init__(self, state_dir: Path, *extra: str, ready_timeout: float = 20.0) -> None:
        self.state_dir = state_dir
        self.extra = extra
        self.ready_timeout = ready_timeout
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[dict[str, Any] | str] = []
        self.stderr: list[str] = []
        self.ports: dict[str, int] = {}
        self._new_line = asyncio.Event()
        self._readers: list[asyncio.Task[None]] = []

    @property
    def listen(self) -> str:
        return f"127.0.0.1:{self.ports['listen']}"

    @property
    def admin(self) -> str:
        return f"127.0.0.1:{self.ports['admin']}"

    async def start(self, listen_port: int = 0, admin_port: int = 0) -> ControlProcess:
        env = {**os.environ, "PYTHONPATH": str(_ROOT)}
        self.lines.clear()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "control", "serve", "--state-dir", str(self.state_dir),
            "--listen", f"127.0.0.1:{listen_port}", "--admin", f"127.0.0.1:{admin_port}",
            *self.extra, cwd=str(_ROOT), env=env, limit=1 << 20,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        self._readers = [asyncio.create_task(self._read(self.proc.stdout, self.lines)),
                         asyncio.create_task(self._read(self.proc.stderr, self.stderr))]
        try:
            [serving] = await self.wait_for_event("serving", timeout=self.ready_timeout)
        except TimeoutError:
            await self.stop()
            raise ControlFailed(f"not serving: stderr={self.stderr[-5:]} stdout={self.lines[-5:]}") from None
        self.ports = dict(serving["ports"])
        return self

    async def _read(self, stream: asyncio.StreamReader | None, sink: list[Any]) -> None:
        assert stream is not None
        while line := await stream.readline():
            sink.append(decode_line(line))
            self._new_line.set()
        self._new_line.set()

    def events(self, name: str, where: Callable[[dict[str, Any]], bool] | None = None) -> list[dict[str, Any]]:
        return [line for line in self.lines if isinstance(line, dict) and line.get("event") == name
                and (where is None or where(line))]

    async def wait_for_event(self, name: str, *, count: int = 1, timeout: float = 10.0,
                             where: Callable[[dict[str, Any]], bool] | None = None) -> list[dict[str, Any]]:
        async with asyncio.timeout(timeout):
            while len(self.events(name, where)) < count:
                if self.proc is not None and self.proc.returncode is not None:
                    raise ControlFailed(f"exited {self.proc.returncode}: {self.stderr[-5:]}")
                self._new_line.clear()
                await self._new_line.wait()
        return self.events(name, where)

    async def pakectl(self, *args: str, timeout: float = 30.0) -> CliResult:
        if args and args[0] in _ADMIN_COMMANDS:
            args = (*args, "--admin", self.admin)
        return await run_pakectl(*args, timeout=timeout)

    async def token(self, service: str, *extra: str) -> str:
        result = await self.pakectl("token", "create", "--service", service, *extra)
        assert result.code == 0, result.stderr
        return result.stdout.strip()

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        async with asyncio.timeout(20):
            code = await self.proc.wait()
        await asyncio.gather(*self._readers, return_exceptions=True)
        return code

    async def __aenter__(self) -> ControlProcess:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.returncode is None:
            await self.stop()
