"""The mTLS quickstart, with the gateway in front of it, as a user runs it: ``make certs``
(``python -m examples.certs``) and ``make demo`` (``python -m examples.demo``), as real processes. The demo runs with
``--any-ports`` (every process on port 0, wired from their ready lines) and its own
certificate folder, so it neither needs free fixed ports nor touches examples/mtls/certs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from pathlib import Path

import aiohttp
from cryptography import x509

from certs.pem import load_certificate

_ROOT = Path(__file__).resolve().parents[2]
FRONTEND_ID = "spiffe://pake.local/service/frontend"
GATEWAY_ID = "spiffe://pake.local/service/gateway"


async def _run(*argv: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *argv, cwd=_ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_make_certs_is_idempotent_and_keys_are_private(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    out = await _run("-m", "examples.certs", "--out", str(certs))
    assert "$ pakectl ca init" in out and out.count("$ pakectl certs issue") == 3
    assert "$ pakectl certs issue --service gateway" in out  # the gateway's mTLS identity
    assert (certs / "ca").stat().st_mode & 0o777 == 0o700
    for key in ("ca/ca-key.pem", "frontend-key.pem", "echo-key.pem", "gateway-key.pem",
                "demo-gateway-server-key.pem"):
        assert (certs / key).stat().st_mode & 0o777 == 0o600, key
    serials = {s: load_certificate(certs / f"{s}.pem").serial_number
               for s in ("frontend", "echo", "gateway", "demo-gateway-server")}
    # the outside listener's certificate: self-signed, for localhost and 127.0.0.1, named a demo
    server = load_certificate(certs / "demo-gateway-server.pem")
    assert server.issuer == server.subject and "DEMO" in server.subject.rfc4514_string()
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]

    out = await _run("-m", "examples.certs", "--out", str(certs))
    assert "nothing to do" in out and "pakectl" not in out
    # A broken file is repaired; the rest is left alone.
    (certs / "echo-key.pem").unlink()
    out = await _run("-m", "examples.certs", "--out", str(certs))
    assert out.count("$ pakectl certs issue --service echo") == 1 and "frontend" not in out
    assert load_certificate(certs / "frontend.pem").serial_number == serials["frontend"]
    assert load_certificate(certs / "echo.pem").serial_number != serials["echo"]
    # the demo server certificate too: a mismatched key is repaired, the workloads untouched
    (certs / "demo-gateway-server-key.pem").write_bytes((certs / "echo-key.pem").read_bytes())
    out = await _run("-m", "examples.certs", "--out", str(certs))
    assert "re-making the demo gateway server certificate" in out and "pakectl" not in out
    assert load_certificate(certs / "demo-gateway-server.pem").serial_number != serials["demo-gateway-server"]
    assert load_certificate(certs / "gateway.pem").serial_number == serials["gateway"]


async def test_demo_serves_over_mtls_and_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "examples.demo", "--any-ports", "--certs", str(tmp_path / "certs"),
        cwd=_ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, limit=1 << 20)
    assert proc.stdout is not None
    lines: list[str] = []
    pids: list[int] = []
    try:
        async with asyncio.timeout(40):
            while not any("demo ready" in line for line in lines):
                raw = await proc.stdout.readline()
                assert raw, f"demo ended before it was ready: {lines[-10:]}"
                line = raw.decode().rstrip()
                lines.append(line)
                if m := re.search(r"started \S+ \(pid (\d+)\)", line):
                    pids.append(int(m.group(1)))
        ready = re.search(r"demo ready outbound=(\d+) gateway=(\d+)", lines[-1])
        assert ready, lines[-1]
        outbound, gateway = int(ready.group(1)), int(ready.group(2))
        assert len(pids) == 4  # the echo app, echo's sidecar, the gateway, frontend's sidecar
        # The demo's own check went through, and so does ours: the echo app sees the caller's
        # SPIFFE ID, which only the echo sidecar's verified mTLS handshake can put there.
        assert any(f"-> 200; the echo app saw x-pake-peer-identity: {FRONTEND_ID}" in line for line in lines)
        async with aiohttp.ClientSession() as http:
            async with http.get("http://echo/hello", proxy=f"http://127.0.0.1:{outbound}") as resp:
                assert resp.status == 200
                body = await resp.json()
        headers = {k.lower(): v for k, v in body["headers"].items()}
        assert headers["x-pake-peer-identity"] == FRONTEND_ID

        # The gateway, as the demo tells a user to call it: tokens from mint_token.
        assert any("the gateway:" in line for line in lines)
        assert any(f"http://127.0.0.1:{gateway}/echo/hello" in line for line in lines)
        admin = {"Authorization": "Bearer " + (await _run(
            "-m", "examples.mint_token", "--sub", "alice", "--role", "admin")).strip()}
        reader = {"Authorization": "Bearer " + (await _run(
            "-m", "examples.mint_token", "--sub", "bob", "--role", "reader")).strip()}
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{gateway}/echo/hello", headers=admin) as resp:
                assert resp.status == 200
                seen = {k.lower(): v for k, v in (await resp.json())["headers"].items()}
            # it reached the echo app through echo's sidecar, over mTLS with the gateway's identity
            assert seen["x-pake-peer-identity"] == GATEWAY_ID and seen["x-user"] == "alice"
            async with http.get(f"http://127.0.0.1:{gateway}/echo/admin/stats", headers=admin) as resp:
                assert resp.status == 200
            async with http.get(f"http://127.0.0.1:{gateway}/echo/admin/stats", headers=reader) as resp:
                assert resp.status == 403
                assert (await resp.json())["error"] == "forbidden"
            async with http.get(f"http://127.0.0.1:{gateway}/echo/hello", headers=reader) as resp:
                assert resp.status == 200
            # echo's own sidecar enforces echo's policy (examples/mtls/mesh.yaml): frontend
            # calls echo without a token, so /echo/admin/ is refused there, not at an edge
            async with http.get("http://echo/echo/admin/stats", proxy=f"http://127.0.0.1:{outbound}") as resp:
                assert resp.status == 403
                assert (await resp.json())["service"] == "echo"

        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(40):
            rest = (await proc.stdout.read()).decode().splitlines()
            assert await proc.wait() == 0, rest[-10:]
        assert rest[-1] == "[demo] stopped"
        assert sum("exited" in line for line in rest) == 4
        for pid in pids:  # reaped by the demo, not orphaned
            assert not _alive(pid), pid
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
