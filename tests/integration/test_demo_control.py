"""``make demo`` (``python -m examples.demo``) as a user runs it: a control plane first, then
the apps and their sidecars joined with tokens. Real processes; ``--any-ports`` (every
process on port 0, wired from their ready lines) and a temporary ``--state-dir``, so it
neither needs free fixed ports nor touches the checkout's ``.pake/demo/``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from pathlib import Path

import aiohttp

from control.admin_client import DEFAULT_ADMIN
from examples.mint_token import mint
from examples.pake.launch import CONTROL
from tests.helpers.control_process import run_pakectl

_ROOT = Path(__file__).resolve().parents[2]
FRONTEND_ID = "spiffe://pake.local/service/frontend"
GATEWAY_ID = "spiffe://pake.local/service/gateway"


def alive(pid: int) -> bool:
    """Is ``pid`` still a process (a zombie counts as gone: it runs nothing)?"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def descendants(pid: int) -> set[int]:
    """Every process below ``pid``, from /proc (children of children included)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                found.add(child)
                todo.append(child)
    return found


class DemoProcess:
    """``python -m <module> --any-ports --state-dir DIR ...``: reads its output line by line."""

    def __init__(self, module: str, state_dir: Path, *extra: str) -> None:
        self.argv = [sys.executable, "-m", module, "--any-ports", "--state-dir", str(state_dir), *extra]
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self.pids: set[int] = set()

    async def start(self) -> DemoProcess:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, cwd=_ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            limit=1 << 22)
        return self

    async def until(self, pattern: str, timeout: float) -> re.Match[str]:
        """Read until a line matches ``pattern``; the match."""
        assert self.proc is not None and self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.proc.stdout.readline()
                assert raw, f"ended before {pattern!r}: {[l for l in self.lines if l.startswith('[demo]')][-15:]}"
                line = raw.decode().rstrip()
                self.lines.append(line)
                if m := re.search(r"\[demo\] started \S+ \(pid (\d+)\)", line):
                    self.pids.add(int(m.group(1)))
                if m := re.search(pattern, line):
                    return m

    async def finish(self, timeout: float = 60.0) -> int:
        """Read the rest; the exit status."""
        assert self.proc is not None and self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            self.lines += (await self.proc.stdout.read()).decode().splitlines()
            return await self.proc.wait()

    async def interrupt(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        return await self.finish()

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


async def pakectl(admin: str, *args: str) -> tuple[int, str]:
    result = await run_pakectl(*args, "--admin", admin)
    return result.code, result.stdout + result.stderr


def test_the_demo_control_plane_is_where_pakectl_looks_by_default() -> None:
    # `pakectl status` / `pakectl check` with no flags talk to the demo's control plane
    assert CONTROL["admin"] == DEFAULT_ADMIN


async def test_make_demo_joins_the_control_plane_and_a_restart_keeps_its_state(tmp_path: Path) -> None:
    state = tmp_path / "state"
    demo = await DemoProcess("examples.demo", state).start()
    try:
        ready = await demo.until(r"demo ready outbound=(\d+) gateway=(\d+) admin=(\d+)", 90)
        outbound, gateway, admin = (int(g) for g in ready.groups())
        assert demo.proc is not None
        children = descendants(demo.proc.pid)
        assert demo.pids <= children and len(demo.pids) == 12  # control, apps, 10 sidecars
        admin_address = f"127.0.0.1:{admin}"
        assert any("mesh.yaml applied as version 1" in line for line in demo.lines)
        # the demo's own check went through: the echo app saw the caller's verified SPIFFE ID
        assert any(f"-> 200; the echo app saw x-pake-peer-identity: {FRONTEND_ID}" in line
                   for line in demo.lines)
        assert any(f"dashboard:  http://{admin_address}/dashboard" in line for line in demo.lines)
        assert any(f"gateway:    http://127.0.0.1:{gateway}" in line for line in demo.lines)
        assert any("gateway: GET /api/ask?q=mesh as alice -> 200" in line for line in demo.lines)
        async with aiohttp.ClientSession() as http:
            async with http.get("http://echo/hello", proxy=f"http://127.0.0.1:{outbound}") as resp:
                assert resp.status == 200
                seen = {k.lower(): v for k, v in (await resp.json())["headers"].items()}
            assert seen["x-pake-peer-identity"] == FRONTEND_ID
            admin_token = {"Authorization": "Bearer " + mint("alice", ["admin"], ttl=300)}
            reader = {"Authorization": "Bearer " + mint("bob", ["reader"], ttl=300)}
            async with http.get(f"http://127.0.0.1:{gateway}/echo/hello", headers=admin_token) as resp:
                assert resp.status == 200
                seen = {k.lower(): v for k, v in (await resp.json())["headers"].items()}
            assert seen["x-pake-peer-identity"] == GATEWAY_ID and seen["x-user"] == "alice"
            async with http.get(f"http://127.0.0.1:{gateway}/echo/admin/stats", headers=reader) as resp:
                assert resp.status == 403
            async with http.get(f"http://127.0.0.1:{gateway}/echo/hello") as resp:
                assert resp.status == 401
            async with http.get(f"http://127.0.0.1:{admin}/dashboard") as resp:
                assert resp.status == 200
        code, out = await pakectl(admin_address, "check")
        assert code == 0, out
        code, out = await pakectl(admin_address, "status", "--json")
        assert code == 0, out
        status = json.loads(out)
        assert {s["service"] for s in status["sidecars"] if s["state"] == "acked"} == {
            "echo", "gateway", "frontend", "auth", "data", "ai", "ai-canary", "knowledge", "cache", "audit"}
        fingerprint = status["ca"]["fingerprint"]

        assert await demo.interrupt() == 0, demo.lines[-10:]
        assert demo.lines[-1] == "[demo] stopped"
        assert not [pid for pid in children if alive(pid)]  # nothing left behind

        # Restarted: the same CA, the same applied version, no new join tokens needed.
        demo = await DemoProcess("examples.demo", state).start()
        ready = await demo.until(r"demo ready outbound=(\d+) gateway=(\d+) admin=(\d+)", 90)
        assert any("mesh.yaml already running as version 1" in line for line in demo.lines)
        code, out = await pakectl(f"127.0.0.1:{ready.group(3)}", "status", "--json")
        assert json.loads(out)["ca"]["fingerprint"] == fingerprint
        assert not any('"event": "joined"' in line for line in demo.lines)  # identities held
        assert await demo.interrupt() == 0
        assert not [pid for pid in demo.pids if alive(pid)]
    finally:
        await demo.kill()
