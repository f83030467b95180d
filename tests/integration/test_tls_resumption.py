"""TLS session resumption never lets in a peer that a full handshake would refuse now (issue 12).

The inbound listener's session tickets outlive a CA rotation (they are sealed with the
listener's keys), and a resumed handshake shows no certificate. A real client resumes a
session: while its certificate is still trusted (a rotation's overlap) it is served as
before; once its root has left the bundle, or its certificate has expired, the sidecar
closes the resumed connection before reading a request.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
from cryptography import x509

from certs.ca import CertificateAuthority
from certs.issue import issue_workload
from tests.helpers.pki import make_test_pki
from tests.helpers.sidecar_process import SidecarProcess
from tests.helpers.upstreams import RecordingUpstream

REQUEST = b"GET /r HTTP/1.1\r\nhost: orders\r\nconnection: close\r\n\r\n"


def _exchange(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None) -> tuple[bytes, bool, ssl.SSLSession | None]:
    """One request on a new TLS connection (blocking: run in a thread): what came back,
    whether the session was resumed, and the session to offer next time."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="orders", session=session) as tls:
        resumed = bool(tls.session_reused)
        tls.sendall(REQUEST)
        data = b""
        try:
            while chunk := tls.recv(65536):
                data += chunk
        except (ConnectionError, ssl.SSLError):
            pass
        return data, resumed, tls.session


async def exchange(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None
                   ) -> tuple[bytes, bool, ssl.SSLSession | None]:
    return await asyncio.to_thread(_exchange, port, ctx, session)


def _client_context(cert: Path, key: Path, roots: bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=roots.decode())
    ctx.load_cert_chain(cert, key)
    return ctx


def _replace(path: Path, data: bytes) -> None:
    """Write then rename: the watcher never reads a half-written file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


async def _bundle_roots(sc: SidecarProcess, http: aiohttp.ClientSession, count: int) -> None:
    """Wait until the sidecar's TLS source holds ``count`` roots (a reload was applied)."""
    async with asyncio.timeout(10):
        while True:
            async with http.get(sc.admin + "/config") as resp:
                if len((await resp.json())["tls"]["bundle"]) == count:
                    return
            await sc.wait_for_event("tls_reloaded", count=len(sc.events("tls_reloaded")) + 1)


async def test_a_session_resumed_after_its_root_left_the_bundle_is_refused(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path / "pki", services=["orders", "frontend"])
    new_ca = CertificateAuthority.init(tmp_path / "new-ca", "pake.local")
    old_root, new_root = pki.bundle.read_bytes(), new_ca.bundle_pem()
    orders, frontend = pki.services["orders"], pki.services["frontend"]
    # the client trusts both roots, so only the sidecar's decision can refuse it
    client = _client_context(frontend.cert, frontend.key, old_root + new_root)
    async with RecordingUpstream() as app, aiohttp.ClientSession() as http:
        sc = SidecarProcess(tmp_path, name="orders", bootstrap={
            "service": "orders", "app": app.address, "access_log": {"enabled": False},
            "tls": {"cert": str(orders.cert), "key": str(orders.key), "bundle": str(orders.bundle)},
            "listeners": {"inbound": {"address": "127.0.0.1:0", "tls": True}, "admin": "127.0.0.1:0"}},
            mesh={"services": {"orders": {"endpoints": []}, "frontend": {"endpoints": []}}})
        async with sc:
            port = sc.ports["inbound"]
            data, resumed, session = await exchange(port, client)
            assert data.startswith(b"HTTP/1.1 200") and not resumed
            data, resumed, session = await exchange(port, client, session)
            assert data.startswith(b"HTTP/1.1 200") and resumed  # resumption works at all

            # the rotation's overlap: both roots; a resumed session is still trusted
            _replace(orders.bundle, old_root + new_root)
            await _bundle_roots(sc, http, 2)
            data, resumed, session = await exchange(port, client, session)
            assert data.startswith(b"HTTP/1.1 200") and resumed

            # the old root is removed: a full handshake would refuse this client now ...
            files = issue_workload(new_ca, "orders", tmp_path / "rotated", timedelta(hours=1))
            _replace(orders.key, files.key.read_bytes())
            _replace(orders.cert, files.cert.read_bytes())
            _replace(orders.bundle, new_root)
            await _bundle_roots(sc, http, 1)
            data, resumed, _ = await exchange(port, client)
            assert not data.startswith(b"HTTP/1.1 200")
            # ... and so must a resumption of the session it holds
            data, resumed, _ = await exchange(port, client, session)
            assert resumed, "the client did not resume: the test proves nothing"
            assert data == b"", f"a resumed session of a removed root was served: {data[:60]!r}"
            # (log lines leave through the writer thread: wait for the line, do not race it)
            await sc.wait_for_event("tls_peer_refused")
            refused = [e for e in sc.events("tls_peer_refused") if e.get("reason") == "resumed_unknown_ca"]
            assert len(refused) == 1
    assert app.requests == 3


async def test_a_session_resumed_after_its_certificate_expired_is_refused(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path / "pki", services=["orders"])
    orders = pki.services["orders"]
    async with RecordingUpstream() as app:
        sc = SidecarProcess(tmp_path, name="orders", bootstrap={
            "service": "orders", "app": app.address, "access_log": {"enabled": False},
            "tls": {"cert": str(orders.cert), "key": str(orders.key), "bundle": str(orders.bundle)},
            "listeners": {"inbound": {"address": "127.0.0.1:0", "tls": True}, "admin": "127.0.0.1:0"}},
            mesh={"services": {"orders": {"endpoints": []}, "frontend": {"endpoints": []}}})
        async with sc:
            port = sc.ports["inbound"]
            # a client certificate that expires two seconds from now
            life = timedelta(hours=1)
            short = pki.issue("frontend", ttl=life, now=datetime.now(UTC) - life + timedelta(seconds=2),
                              out_dir=tmp_path / "short")
            client = _client_context(short.cert, short.key, pki.bundle.read_bytes())
            data, resumed, session = await exchange(port, client)
            assert data.startswith(b"HTTP/1.1 200")
            not_after = x509.load_pem_x509_certificate(short.cert.read_bytes()).not_valid_after_utc
            # (the one wait on the clock: expiry is the clock's business)
            await asyncio.sleep(max(0.0, (not_after - datetime.now(UTC)).total_seconds()) + 1.1)
            data, resumed, _ = await exchange(port, client, session)
            assert resumed, "the client did not resume: the test proves nothing"
            assert data == b"", f"a resumed session of an expired certificate was served: {data[:60]!r}"
            await sc.wait_for_event("tls_peer_refused")
            assert [e["reason"] for e in sc.events("tls_peer_refused")] == ["resumed_cert_expired"]
    assert app.requests == 1
