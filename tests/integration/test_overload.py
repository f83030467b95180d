"""Overload protection (issue 12): connection caps, the TLS handshake cap, and the overload
monitor's fast 503 ``OL``. Real sidecar processes, raw sockets, real mTLS on port 0.

Caps: past ``limits.max_connections`` (one listener) or ``limits.max_total_connections``
(all listeners) a new connection is closed at once, before a byte is read, and counted in
``pake_downstream_connections_refused_total{listener, reason}``; open ones keep working.

The handshake cap, precisely: ``limits.max_tls_handshakes`` connections of a TLS listener
may be in their handshake at once. Clients that open TCP and never send a ClientHello hold a
slot each, until ``timeouts.tls_handshake`` ends them. Meanwhile (1) a connection past the
cap, whoever opens it, is closed at once (reason ``max_tls_handshakes``), (2) an mTLS
connection already established is served as usual, and (3) once the silent ones have
timed out, a new mTLS client is served.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import ssl
import time
from pathlib import Path
from typing import Any

import yaml

from tests.helpers.pki import make_test_pki
from tests.helpers.sidecar_process import SidecarProcess
from tests.helpers.upstreams import RecordingUpstream

MESH: dict[str, Any] = {"services": {"app": {"endpoints": []}, "frontend": {"endpoints": []}}}


async def _open(port: int, ctx: ssl.SSLContext | None = None
                ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="" if ctx else None)


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str = "app",
               path: str = "/") -> tuple[int, dict[str, str], bytes]:
    writer.write(f"GET {path} HTTP/1.1\r\nhost: {host}\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    pairs = (line.split(": ", 1) for line in lines[1:] if line)
    headers = {name.lower(): value for name, value in pairs}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(lines[0].split()[1]), headers, body


async def _closed_at_once(reader: asyncio.StreamReader, within: float = 1.0) -> bool:
    """The server closed the connection without sending a byte, within ``within``."""
    try:
        return await asyncio.wait_for(reader.read(1), within) == b""
    except ConnectionError:
        return True
    except TimeoutError:
        return False


async def _metrics(sc: SidecarProcess) -> str:
    reader, writer = await _open(sc.ports["admin"])
    try:
        _, _, body = await _get(reader, writer, host="admin", path="/metrics")
        return body.decode()
    finally:
        writer.close()


def _refused(text: str, listener: str, reason: str) -> float:
    m = re.search(rf'^pake_downstream_connections_refused_total\{{listener="{listener}",reason="{reason}"\}} (\S+)$',
                  text, re.M)
    return float(m.group(1)) if m else 0.0


async def test_past_the_listener_and_total_caps_new_connections_are_closed_at_once(tmp_path: Path) -> None:
    async with RecordingUpstream() as app:
        sc = SidecarProcess(tmp_path, mesh=MESH, bootstrap={
            "service": "app", "app": app.address, "access_log": {"enabled": False},
            "limits": {"max_connections": 5, "max_total_connections": 8},
            "listeners": {"outbound": "127.0.0.1:0", "inbound": {"address": "127.0.0.1:0", "tls": False},
                          "admin": "127.0.0.1:0"}})
        async with sc:
            held = []
            for _ in range(5):  # one request each: the sidecar holds all five
                conn = await _open(sc.ports["inbound"])
                assert (await _get(*conn))[0] == 200
                held.append(conn)
            sixth = await _open(sc.ports["inbound"])
            assert await _closed_at_once(sixth[0]), "past max_connections a connection stayed open"
            for _ in range(3):
                conn = await _open(sc.ports["outbound"])
                assert (await _get(*conn, host="frontend"))[0] in (503, 404)  # answered: held
                held.append(conn)
            ninth = await _open(sc.ports["outbound"])
            assert await _closed_at_once(ninth[0]), "past max_total_connections a connection stayed open"
            for conn in held[:5]:  # the open ones are unaffected
                assert (await _get(*conn))[0] == 200
            text = await _metrics(sc)
            assert _refused(text, "inbound", "max_connections") == 1
            assert _refused(text, "outbound", "max_total_connections") == 1
            for _, writer in (*held, sixth, ninth):
                writer.close()


async def test_silent_tls_clients_fill_the_handshake_cap_but_do_not_lock_out_mtls(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path / "pki", services=["app", "frontend"])
    files, client = pki.services["app"], pki.services["frontend"]
    good = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    good.check_hostname = False
    good.load_verify_locations(cafile=client.bundle)
    good.load_cert_chain(client.cert, client.key)
    handshake_timeout = 2.0
    async with RecordingUpstream() as app:
        sc = SidecarProcess(tmp_path, mesh=MESH, bootstrap={
            "service": "app", "app": app.address, "access_log": {"enabled": False},
            "tls": {"cert": str(files.cert), "key": str(files.key), "bundle": str(files.bundle)},
            "limits": {"max_tls_handshakes": 4},
            "timeouts": {"tls_handshake": "2s"},
            "listeners": {"inbound": {"address": "127.0.0.1:0", "tls": True}, "admin": "127.0.0.1:0"}})
        async with sc:
            port = sc.ports["inbound"]
            established = await _open(port, good)
            assert (await _get(*established))[0] == 200
            silent = [await _open(port) for _ in range(4)]  # TCP only: never a ClientHello
            started = time.monotonic()
            past = await _open(port)
            assert await _closed_at_once(past[0], within=0.5), "a fifth silent client was let in"
            try:  # a real mTLS client is refused too, at once, while the cap is full
                refused = await asyncio.wait_for(_open(port, good), 1.0)
                assert await _closed_at_once(refused[0], within=0.5)
            except (ConnectionError, ssl.SSLError):
                pass
            assert (await _get(*established))[0] == 200  # the established one is served meanwhile
            for reader, _ in silent:  # the silent ones end at the handshake timeout ...
                assert await _closed_at_once(reader, within=handshake_timeout + 2.0)
            assert time.monotonic() - started >= handshake_timeout - 0.5
            fresh = await _open(port, good)  # ... and a new mTLS client is served
            assert (await _get(*fresh))[0] == 200
            assert _refused(await _metrics(sc), "inbound", "max_tls_handshakes") == 2
            for _, writer in (*silent, past, established, fresh):
                writer.close()


def _write_bootstrap(sc: SidecarProcess, **changes: Any) -> None:
    sc.bootstrap = {**sc.bootstrap, **changes}
    sc.config_path.write_text(yaml.safe_dump(sc.bootstrap))


async def test_past_the_memory_threshold_requests_get_503_ol_until_it_is_raised(tmp_path: Path) -> None:
    async with RecordingUpstream() as app:
        sc = SidecarProcess(tmp_path, mesh=MESH, bootstrap={
            "service": "app", "app": app.address, "access_log": {"enabled": False},
            "overload": {"max_memory": "1MiB", "interval": "50ms"},  # any process is past it
            "listeners": {"inbound": {"address": "127.0.0.1:0", "tls": False}, "admin": "127.0.0.1:0"}})
        async with sc:
            await sc.wait_for_event("overload_started")
            conn = await _open(sc.ports["inbound"])
            status, headers, body = await _get(*conn)
            assert (status, headers["x-pake-flags"], headers["connection"]) == (503, "OL", "close")
            assert json.loads(body)["error"] == "overloaded"
            assert await _closed_at_once(conn[0])  # keep-alive is off
            conn[1].close()
            assert app.requests == 0  # refused before any upstream work
            text = await _metrics(sc)  # (admin is not behind the gate: operators can look)
            assert re.search(r"^pake_overload_active 1\.0$", text, re.M)
            assert re.search(r'^pake_local_replies_total\{flag="OL",listener="inbound"\} 1\.0$', text, re.M)

            _write_bootstrap(sc, overload={"max_memory": "4GiB", "interval": "50ms"})
            sc.send_signal(signal.SIGHUP)
            await sc.wait_for_event("overload_ended")
            conn = await _open(sc.ports["inbound"])
            status, headers, _ = await _get(*conn)
            assert status == 200 and headers.get("connection") != "close"
            assert (await _get(*conn))[0] == 200  # keep-alive again
            conn[1].close()
