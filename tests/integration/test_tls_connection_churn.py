"""A sidecar that opens a new mTLS connection for every request (``pool: {max_idle: 0}``)
keeps its memory flat.

Regression: a client offering TLS sessions grew by ~2.5-6.6 KB of native memory per new
connection without bound (CPython ssl + OpenSSL 3, on uvloop and asyncio alike), so the
sidecar offers none unless ``tls.resume_upstream_sessions`` asks for it; its inbound side
still resumes sessions that clients offer.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from tests.helpers.pki import make_test_pki
from tests.helpers.sidecar_process import SidecarProcess
from tests.helpers.upstreams import RecordingUpstream

WARM_UP = 1600
MEASURED = 3200
# Without a leak the frontend still grows ~2 KB a connection here while the allocator's
# high-water mark settles (uvloop keeps a 256 KiB TLS buffer per connection; it flattens after
# ~16k connections): ~5-6 MB over MEASURED. The leak added 2.5-6.6 KB a connection on top,
# >= 12.5 MB over MEASURED. The bound sits between the two.
BOUND_KB = 10 * 1024


def _rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))


async def test_new_mtls_connections_per_request_leave_memory_flat(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path / "pki", services=["echo", "frontend"])

    def tls(name: str) -> dict[str, str]:
        files = pki.services[name]
        return {"cert": str(files.cert), "key": str(files.key), "bundle": str(files.bundle)}

    async with RecordingUpstream() as app:
        echo = SidecarProcess(tmp_path, name="echo", bootstrap={
            "service": "echo", "app": app.address, "tls": tls("echo"), "access_log": {"enabled": False},
            "listeners": {"inbound": {"address": "127.0.0.1:0", "tls": True}, "admin": "127.0.0.1:0"}},
            mesh={"services": {"echo": {"endpoints": []}, "frontend": {"endpoints": []}}})
        async with echo:
            mesh = {"services": {"frontend": {"endpoints": []},
                                 "echo": {"endpoints": [f"127.0.0.1:{echo.ports['inbound']}"],
                                          "pool": {"max_idle": 0}}}}
            front = SidecarProcess(tmp_path, name="frontend", mesh=mesh, bootstrap={
                "service": "frontend", "tls": tls("frontend"), "access_log": {"enabled": False},
                "listeners": {"outbound": "127.0.0.1:0", "admin": "127.0.0.1:0"}})
            async with front, aiohttp.ClientSession() as http:
                assert front.proc is not None

                async def requests(n: int) -> None:
                    for _ in range(n):
                        async with http.get(front.url() + "/", headers={"Host": "echo"}) as resp:
                            assert resp.status == 200

                await asyncio.gather(*(requests(WARM_UP // 8) for _ in range(8)))
                before = _rss_kb(front.proc.pid)
                await asyncio.gather(*(requests(MEASURED // 8) for _ in range(8)))
                grown = _rss_kb(front.proc.pid) - before
                async with http.get(echo.admin + "/metrics") as resp:
                    metrics = await resp.text()
    handshakes = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                     if line.startswith("pake_tls_handshakes_total") and 'side="server"' in line)
    assert handshakes >= WARM_UP + MEASURED, f"only {handshakes} handshakes for {WARM_UP + MEASURED} requests"
    assert grown < BOUND_KB, f"the frontend grew {grown} kB over {MEASURED} more new mTLS connections"
