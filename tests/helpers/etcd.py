"""A real single-member etcd for tests, on loopback, with its data in a temp dir.

``async with EtcdServer(tmp_path) as etcd:`` starts ``etcd`` and returns once it serves
clients (its log line, then ``/health``); leaving the block stops it. The peer port is 0
(etcd binds a free one). The client port cannot be 0: etcd's JSON gateway dials the
configured client address, so a free port is picked and, should another process take it
before etcd binds it, etcd is started again on another one (the race is detected, not
ignored). ``ETCD_*`` variables are dropped from etcd's environment: a flag that an
environment variable shadows makes etcd refuse to start.

Missing binary: ``require_etcd()`` fails the test when ``CI`` is set, and skips it with the
install command otherwise.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import json
import os
import shutil
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

__all__ = ["EtcdFailed", "EtcdServer", "require_etcd"]

INSTALL = "apt-get install -y etcd-server"
_START_ATTEMPTS = 5
_READY = "serving client traffic insecurely"  # zap message once the client listener serves
_PR_SET_PDEATHSIG = 1


class EtcdFailed(Exception):
    pass


def require_etcd() -> str:
    """The etcd binary's path; fails (CI) or skips (elsewhere) the test when there is none."""
    path = shutil.which("etcd")
    if path is None:
        message = f"the etcd binary is not on PATH; install it with: {INSTALL}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def _free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """In the child before exec: a test run that is killed takes its etcd with it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class EtcdServer:
    def __init__(self, workdir: Path, *, name: str = "etcd", ready_timeout: float = 15.0,
                 pick_port: Callable[[], int] = _free_loopback_port) -> None:
        self.binary = require_etcd()
        self.pick_port = pick_port
        self.dir = workdir / name
        self.data_dir = self.dir / "data"
        self.name = name
        self.ready_timeout = ready_timeout
        self.port = 0
        self.proc: asyncio.subprocess.Process | None = None
        self.log: collections.deque[str] = collections.deque(maxlen=400)
        self._reader: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def endpoints(self) -> list[str]:
        return [self.url]

    async def start(self) -> EtcdServer:
        """Start etcd (again: same data dir and port after a ``stop``)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        reuse_port = self.port != 0
        for _ in range(_START_ATTEMPTS):
            if not reuse_port:
                self.port = self.pick_port()
            if await self._start_once():
                await self._check_health()
                return self
            if not reuse_port and self._bind_race_lost():
                # someone took the port between our pick and etcd's bind: a fresh member elsewhere
                shutil.rmtree(self.data_dir, ignore_errors=True)
                continue
            break
        raise EtcdFailed(f"etcd did not start on 127.0.0.1:{self.port}: {list(self.log)[-8:]}")

    def _bind_race_lost(self) -> bool:
        return any("address already in use" in line for line in self.log)

    async def _start_once(self) -> bool:
        env = {key: value for key, value in os.environ.items() if not key.startswith("ETCD_")}
        self.log.clear()
        self._ready.clear()
        self.proc = await asyncio.create_subprocess_exec(
            self.binary, "--name", self.name, "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
            "--listen-peer-urls", "http://127.0.0.1:0", "--initial-advertise-peer-urls", "http://127.0.0.1:0",
            "--initial-cluster", f"{self.name}=http://127.0.0.1:0",
            # a fast election: a single member leads within ~0.1 s (and leases may be 1 s short)
            "--heartbeat-interval", "10", "--election-timeout", "100",
            "--logger", "zap", "--log-outputs", "stderr",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, cwd=str(self.dir), env=env, preexec_fn=_die_with_parent)
        self._reader = asyncio.create_task(self._read(self.proc.stderr))
        ready = asyncio.create_task(self._ready.wait())
        exited = asyncio.create_task(self.proc.wait())
        await asyncio.wait({ready, exited}, timeout=self.ready_timeout, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        exited.cancel()
        if self._ready.is_set():
            return True
        await self._reap()
        return False

    async def _read(self, stream: asyncio.StreamReader | None) -> None:
        if stream is None:
            raise EtcdFailed("etcd's stderr is not a pipe")
        while line := await stream.readline():
            text = line.decode(errors="replace").rstrip("\n")
            self.log.append(text)
            try:
                record: Any = json.loads(text)
            except ValueError:
                continue
            if (isinstance(record, dict) and _READY in str(record.get("msg", ""))
                    and record.get("address") == f"127.0.0.1:{self.port}"):
                self._ready.set()

    async def _check_health(self) -> None:
        """The log line says the listener serves; /health says the member has a leader."""
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{self.url}/health", timeout=aiohttp.ClientTimeout(total=5)) as response:
                body = await response.json(content_type=None)
        if body.get("health") != "true":
            await self.stop()
            raise EtcdFailed(f"etcd at {self.url} is not healthy: {body}")

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; keeps the data dir and port for ``start``."""
        if self.proc is None or self.proc.returncode is not None:
            await self._reap()
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(10):
                await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
        await self._reap()

    async def kill(self) -> None:
        """SIGKILL: etcd dies without a word to its clients."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
        await self._reap()

    async def _reap(self) -> None:
        if self.proc is not None:
            if self.proc.returncode is None:
                self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None

    async def __aenter__(self) -> EtcdServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
