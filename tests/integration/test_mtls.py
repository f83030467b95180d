"""Sidecar mTLS end to end: real sidecar processes, real TLS on loopback, certificates from
``tests.helpers.pki.make_test_pki``, every port 0.

Refusals are checked from both ends: the client sees the TLS alert (refused *in* the
handshake) or a closed connection without a byte of response (refused after it, before any
request is read); the sidecar counts the reason; the upstream app saw nothing.
"""

from __future__ import annotations

import asyncio
import gc
import io
import re
import shutil
import socket
import ssl
import sys
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvloop
import yaml
from cryptography import x509

from certs import pem
from certs.ca import CertificateAuthority
from certs.ssl_context import TlsContextSource, TlsFiles, server_context
from sidecar.app import Sidecar
from sidecar.config.load import load_bootstrap, parse_mesh
from sidecar.config.model import Bootstrap
from sidecar.observability.log_writer import LogOutputs
from tests.helpers.pki import MeshPki, make_test_pki, unchecked_context
from tests.helpers.sidecar_process import SidecarProcess
from tests.helpers.upstreams import RecordingUpstream

_ROOT = Path(__file__).resolve().parents[2]
ECHO_ID = "spiffe://pake.local/service/echo"
FRONTEND_ID = "spiffe://pake.local/service/frontend"


# === helpers ==============================================================================


def tls_config(files: TlsFiles) -> dict[str, str]:
    return {"cert": str(files.cert), "key": str(files.key), "bundle": str(files.bundle)}


def inbound_sidecar(tmp_path: Path, pki_files: TlsFiles, app: str, *, service: str = "echo",
                    name: str | None = None) -> SidecarProcess:
    """A sidecar whose inbound listener terminates mTLS in front of ``app``."""
    boot = {"service": service, "app": app, "tls": tls_config(pki_files),
            "listeners": {"inbound": {"address": "127.0.0.1:0", "tls": True}, "admin": "127.0.0.1:0"}}
    mesh = {"services": {service: {"endpoints": []}}}
    return SidecarProcess(tmp_path, bootstrap=boot, mesh=mesh, name=name or f"{service}-sidecar")


def client_context(files: TlsFiles) -> ssl.SSLContext:
    """A client like a sidecar's, but built without validating the files (bad ones too)."""
    return unchecked_context("client", files)


def no_cert_context(pki: MeshPki) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(pki.bundle)
    return ctx


def tls_request(port: int, ctx: ssl.SSLContext, request: bytes) -> tuple[bool, bytes | Exception]:
    """Blocking: handshake, send, read to EOF. Whether the handshake completed, and the bytes
    read or the error on the way."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            tls = ctx.wrap_socket(raw, server_hostname="echo.pake.local")
        except (ssl.SSLError, OSError) as exc:
            return False, exc
        with tls:
            try:
                tls.sendall(request)
                data = b""
                while chunk := tls.recv(65536):
                    data += chunk
                return True, data
            except (ssl.SSLError, OSError) as exc:
                return True, exc


def tls12(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """In TLS 1.2 the server judges our certificate before it sends its Finished, so a
    refusal in the handshake is visible to the client as a handshake that did not complete.
    (In TLS 1.3 our side is done first, and learns of a refusal only at its next read.)
    Not a proof alone: a peer refused right after the handshake also never sees the
    server's Finished in TLS 1.2, since the connection is aborted before it is flushed."""
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def peer_serial(port: int, ctx: ssl.SSLContext) -> int:
    """The serial of the certificate a fresh (never resumed) handshake is answered with."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="echo.pake.local") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def serial_of(files: TlsFiles) -> int:
    return pem.load_certificate(files.cert).serial_number


async def metrics(sc: SidecarProcess) -> dict[str, float]:
    """The sidecar's pake_tls_* samples, keyed by the sample line's name and labels."""
    async with aiohttp.ClientSession() as http, http.get(sc.admin + "/metrics") as resp:
        text = await resp.text()
    out = {}
    for line in text.splitlines():
        if line.startswith("pake_tls_"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def failures(samples: dict[str, float], side: str) -> dict[str, float]:
    pattern = re.compile(rf'pake_tls_handshake_failures_total\{{reason="([a-z_0-9]+)",side="{side}"\}}')
    return {m.group(1): v for k, v in samples.items() if (m := pattern.fullmatch(k))}


REQUEST = b"GET /x HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n"


# === inbound: refused handshakes and identities ==========================================

IN_HANDSHAKE = {  # kind -> the reason the sidecar counts
    "no_client_cert": "no_peer_certificate",
    "other_ca": "unknown_ca",
    "expired": "cert_expired",
    "not_yet_valid": "cert_not_yet_valid",
    "no_client_auth": "bad_purpose",
}
AFTER_HANDSHAKE = {  # kind -> the IdentityError reason
    "no_uri_san": "no_uri_san",
    "two_uri_sans": "multiple_uri_sans",
    "wrong_trust_domain": "wrong_trust_domain",
    "not_spiffe": "not_spiffe",
    "ca_as_leaf": "ca_as_leaf",
}


async def test_inbound_refuses_bad_peers_and_passes_the_identity(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path / "pki", services=["echo", "frontend"])
    async with RecordingUpstream() as app, inbound_sidecar(tmp_path, pki.services["echo"], app.address) as sc:
        port = sc.ports["inbound"]
        # Refused in the handshake: it does not complete; the sidecar counts why.
        for kind in IN_HANDSHAKE:
            ctx = no_cert_context(pki) if kind == "no_client_cert" else client_context(pki.bad(kind))
            completed, result = await asyncio.to_thread(tls_request, port, tls12(ctx), REQUEST)
            assert not completed and isinstance(result, OSError), (kind, result)
        # Refused after the handshake, before any request is read: no byte comes back. (The
        # sidecar's handshake counter, below, tells these from the ones refused in it.)
        for kind in AFTER_HANDSHAKE:
            ctx = client_context(pki.bad(kind))
            completed, result = await asyncio.to_thread(tls_request, port, ctx, REQUEST)
            assert completed and (result == b"" or isinstance(result, (ConnectionError, ssl.SSLEOFError))), \
                (kind, result)
        assert app.connections == 0 and app.received == b""

        # A workload of the mesh gets through; a spoofed identity header is replaced.
        spoofed = REQUEST.replace(b"\r\n\r\n", b"\r\nx-pake-peer-identity: spiffe://pake.local/service/admin\r\n\r\n")
        _, result = await asyncio.to_thread(tls_request, port, client_context(pki.services["frontend"]), spoofed)
        assert isinstance(result, bytes) and result.startswith(b"HTTP/1.1 200"), result
        assert app.requests == 1
        identities = re.findall(rb"(?im)^x-pake-peer-identity: *(.*?)\r$", app.received)
        assert identities == [FRONTEND_ID.encode()]

        samples = await metrics(sc)
        async with aiohttp.ClientSession() as http, http.get(sc.admin + "/config") as resp:
            config_text = await resp.text()
            config = await resp.json()

    counted = failures(samples, "server")
    for kind, reason in IN_HANDSHAKE.items():
        assert counted.get(reason) == 1, (kind, counted)
    for kind, reason in AFTER_HANDSHAKE.items():
        assert counted.get(reason) == 1, (kind, counted)
    assert samples['pake_tls_handshakes_total{resumed="false",side="server"}'] == 1 + len(AFTER_HANDSHAKE)
    assert 3500 < samples["pake_tls_certificate_expiry_seconds"] <= 3600
    refused = sc.events("tls_peer_refused")
    assert sorted(e["reason"] for e in refused) == sorted(AFTER_HANDSHAKE.values())
    # /config: the certificate's public facts, never the key
    tls = config["tls"]
    assert tls["spiffe_id"] == ECHO_ID and tls["uri_sans"] == [ECHO_ID]
    assert tls["subject"] == "CN=echo" and tls["serial"] == format(serial_of(pki.services["echo"]), "x")
    assert tls["not_after"] and tls["seconds_to_expiry"] > 0
    assert "PRIVATE KEY" not in config_text
    assert pki.services["echo"].key.read_text().splitlines()[1] not in config_text


# === outbound: identity check ============================================================


def outbound_sidecar(tmp_path: Path, files: TlsFiles, services: dict[str, Any], *,
                     resume: bool = False) -> SidecarProcess:
    tls = {**tls_config(files), "resume_upstream_sessions": resume}
    boot = {"service": "frontend", "tls": tls,
            "listeners": {"outbound": "127.0.0.1:0", "admin": "127.0.0.1:0"}}
    return SidecarProcess(tmp_path, bootstrap=boot, mesh={"services": services}, name="frontend-sidecar")


async def test_outbound_refuses_a_valid_mesh_peer_with_the_wrong_identity(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path / "pki", services=["billing", "frontend"])
    async with RecordingUpstream() as billing_app, \
            inbound_sidecar(tmp_path, pki.services["billing"], billing_app.address, service="billing") as billing:
        # The mesh says echo lives where billing's sidecar listens.
        services = {"echo": {"endpoints": [f"127.0.0.1:{billing.ports['inbound']}"]}}
        async with outbound_sidecar(tmp_path, pki.services["frontend"], services) as front, \
                aiohttp.ClientSession() as http:
            async with http.get(front.url() + "/orders", headers={"Host": "echo"}) as resp:
                assert resp.status == 503
                body = await resp.json()
    assert body["error"] == "upstream_identity_mismatch"
    assert "spiffe://pake.local/service/billing" in body["detail"] and ECHO_ID in body["detail"]
    access = front.events("access")[-1]
    assert access["flags"] == "UPE" and access["status"] == 503
    assert "spiffe://pake.local/service/billing" in access["reason"] and ECHO_ID in access["reason"]
    assert billing_app.connections == 0  # the request never left the frontend


async def test_a_mesh_peer_gets_the_mesh_headers_but_not_the_try_count_its_sidecar_drops(tmp_path: Path) -> None:
    # What the outbound sends to echo's inbound, read as that inbound reads it (decrypted by a
    # recorder presenting echo's identity). x-pake-attempts is the app's: echo's sidecar drops
    # it as mesh-internal and sets its own; a plain (non-mesh) upstream gets it.
    pki = make_test_pki(tmp_path / "pki", services=["echo", "frontend"])
    async with RecordingUpstream(ssl=unchecked_context("server", pki.services["echo"])) as peer, \
            RecordingUpstream() as plain:
        services = {"echo": {"endpoints": [peer.address]},
                    "legacy": {"endpoints": [plain.address], "tls": False}}
        async with outbound_sidecar(tmp_path, pki.services["frontend"], services) as front, \
                aiohttp.ClientSession() as http:
            for host in ("echo", "legacy"):
                async with http.get(front.url() + "/orders", headers={"Host": host}) as resp:
                    assert resp.status == 200, await resp.text()
    to_peer = peer.received.decode().lower()
    assert to_peer.startswith("get /orders http/1.1\r\nhost: echo\r\n")
    for header in ("x-request-id: ", "x-forwarded-for: 127.0.0.1\r\n", "x-forwarded-proto: http\r\n"):
        assert header in to_peer, to_peer
    assert "x-pake-attempts" not in to_peer and to_peer.endswith("\r\n\r\n")
    assert "\r\nx-pake-attempts: 1\r\n\r\n" in plain.received.decode().lower()


def test_a_closed_mtls_connection_frees_its_tls_state_when_it_closes(tmp_path: Path) -> None:
    """With a new connection per request (``pool: {max_idle: 0}``), each closed connection's
    TLS state (the TLS protocol with its memory BIOs, OpenSSL's SSL object) is freed
    when the connection closes, on both sides, not at the next full garbage collection: held
    until then, a pair under such load kept 100+ MB of dead connections (132 / 109 MB of RSS
    after 8,000 requests). Both sidecars run in this process, on uvloop as in production, with
    the cyclic GC off: only reference counting frees anything."""
    pki = make_test_pki(tmp_path / "pki", services=["echo", "frontend"])

    def bootstrap(name: str, boot: dict[str, Any]) -> Bootstrap:
        d = tmp_path / name
        d.mkdir()
        (d / "sidecar.yaml").write_text(yaml.safe_dump({**boot, "mesh": "mesh.yaml"}))
        return load_bootstrap(d / "sidecar.yaml")

    def live_tls_objects() -> int:
        return sum(isinstance(o, ssl.SSLObject) for o in gc.get_objects())

    async def scenario() -> tuple[int, int, int]:
        async with RecordingUpstream() as app:
            started: list[Sidecar] = []  # drained at the end, whatever happened
            writer: asyncio.StreamWriter | None = None
            try:
                echo = Sidecar(bootstrap("echo", {
                    "service": "echo", "app": app.address, "tls": tls_config(pki.services["echo"]),
                    "listeners": {"inbound": {"address": "127.0.0.1:0", "tls": True}}}),
                    parse_mesh({"services": {"echo": {"endpoints": []}}}), logs=LogOutputs())
                await echo.start()
                started.append(echo)
                front = Sidecar(bootstrap("front", {
                    "service": "frontend", "tls": tls_config(pki.services["frontend"]),
                    "listeners": {"outbound": "127.0.0.1:0"}}),
                    parse_mesh({"services": {"echo": {"endpoints": [f"127.0.0.1:{echo.ports()['inbound']}"],
                                                      "pool": {"max_idle": 0}}}}), logs=LogOutputs())
                await front.start()
                started.append(front)
                reader, writer = await asyncio.open_connection("127.0.0.1", front.ports()["outbound"])
                before = live_tls_objects()
                for _ in range(100):
                    writer.write(b"GET / HTTP/1.1\r\nHost: echo\r\n\r\n")
                    head = await reader.readuntil(b"\r\n\r\n")
                    assert head.startswith(b"HTTP/1.1 200"), head
                    await reader.readexactly(2)
                for _ in range(500):  # up to 5 s for the last connections to finish closing
                    if live_tls_objects() <= before:
                        break
                    await asyncio.sleep(0.01)
                handshakes = re.search(rb'pake_tls_handshakes_total\{resumed="false",side="server"\} (\S+)',
                                       echo.metrics.render())
                assert handshakes is not None
                return before, live_tls_objects(), int(float(handshakes.group(1)))
            finally:
                if writer is not None:
                    writer.close()
                for sidecar in reversed(started):
                    sidecar.stopping.set()
                    await sidecar.drain()

    gc.collect()
    gc.disable()
    try:
        before, after, connections = uvloop.run(scenario())
    finally:
        gc.enable()
    assert connections == 100  # each request had its own mTLS connection to echo's sidecar
    assert after <= before, f"{after - before} TLS objects of closed connections still held"


async def test_megabytes_cross_an_mtls_hop_intact_both_ways(tmp_path: Path) -> None:
    """Bodies far larger than a TLS record and than the read buffers go through the TLS layer's
    partial reads and writes (the C methods the sidecar's SSLObject class binds) unchanged."""
    pki = make_test_pki(tmp_path / "pki", services=["echo", "frontend"])
    upload = bytes(range(256)) * (3 * 4096 + 7)  # ~3 MiB, not a multiple of any buffer
    download = bytes(reversed(range(256))) * (2 * 4096 + 3)
    reply = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(download) + download
    async with RecordingUpstream(reply) as app, \
            inbound_sidecar(tmp_path, pki.services["echo"], app.address) as echo:
        services = {"echo": {"endpoints": [f"127.0.0.1:{echo.ports['inbound']}"]}}
        async with outbound_sidecar(tmp_path, pki.services["frontend"], services) as front, \
                aiohttp.ClientSession() as http:
            for _ in range(2):  # the second on the pooled connection
                async with http.post(front.url() + "/upload", data=io.BytesIO(upload),
                                     headers={"Host": "echo"}) as resp:
                    assert resp.status == 200
                    assert await resp.read() == download
    assert app.requests == 2 and app.received.count(upload) == 2


# === two sidecars under load: rotation ====================================================


class ProbeUpstream:
    """A mesh peer run by the test (an mTLS server holding a valid ``probe`` certificate) that
    records the serial of the client certificate of every handshake: what the frontend
    sidecar presents on a new connection."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self.serials: list[int] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    def _protocol(self) -> asyncio.Protocol:
        owner = self

        class Conn(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport
                der = transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
                owner.serials.append(x509.load_der_x509_certificate(der).serial_number)
                self.buf = b""

            def data_received(self, data: bytes) -> None:
                self.buf += data
                while b"\r\n\r\n" in self.buf:
                    _, _, self.buf = self.buf.partition(b"\r\n\r\n")
                    self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nprobe")  # type: ignore[attr-defined]

        return Conn()

    async def __aenter__(self) -> ProbeUpstream:
        ctx = server_context(self.files.cert, self.files.key, self.files.bundle)
        self.server = await asyncio.get_running_loop().create_server(self._protocol, "127.0.0.1", 0, ssl=ctx)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


class Load:
    """Clients looping requests through the frontend sidecar until stopped; counts outcomes."""

    def __init__(self, url: str, concurrency: int = 4) -> None:
        self.url = url
        self.concurrency = concurrency
        self.ok = 0
        self.failed: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._progress = asyncio.Event()

    async def _loop(self, http: aiohttp.ClientSession) -> None:
        while not self._stop.is_set():
            try:
                async with http.get(self.url + "/load", headers={"Host": "echo"}) as resp:
                    await resp.read()
                    if resp.status == 200:
                        self.ok += 1
                    else:
                        self.failed.append(f"{resp.status} {resp.headers.get('x-pake-flags', '')}")
            except aiohttp.ClientError as exc:
                self.failed.append(repr(exc))
            self._progress.set()

    async def more(self, n: int, timeout: float = 10.0) -> None:
        """Wait until ``n`` more requests succeeded (so the load really spans each step)."""
        target = self.ok + n
        async with asyncio.timeout(timeout):
            while self.ok < target and not self.failed:
                self._progress.clear()
                await self._progress.wait()

    @asynccontextmanager
    async def running(self) -> Any:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            self._tasks = [asyncio.create_task(self._loop(http)) for _ in range(self.concurrency)]
            try:
                yield self
            finally:
                self._stop.set()
                await asyncio.gather(*self._tasks)


@asynccontextmanager
async def two_sidecars(tmp_path: Path, pki: MeshPki, probe_port: int | None = None) -> Any:
    """frontend (outbound) -> echo sidecar (inbound mTLS) -> a recording app.

    The frontend keeps at most one idle connection to echo, so the load opens (and
    handshakes) new connections all the time, not just at the start.
    """
    async with RecordingUpstream() as app, inbound_sidecar(tmp_path, pki.services["echo"], app.address) as echo:
        services: dict[str, Any] = {
            "echo": {"endpoints": [f"127.0.0.1:{echo.ports['inbound']}"], "pool": {"max_idle": 1}}}
        if probe_port is not None:  # a new connection (and handshake) per request
            services["probe"] = {"endpoints": [f"127.0.0.1:{probe_port}"], "pool": {"max_idle": 0}}
        # session resumption is opt-in (see TlsFiles.resume_upstream_sessions): on here, so
        # rotation is shown not to resume a session across a certificate change
        async with outbound_sidecar(tmp_path, pki.services["frontend"], services, resume=True) as front:
            yield front, echo, app


async def reissue(pki: MeshPki, *services: str) -> dict[str, int]:
    """New certificates into the live files (the watcher picks them up); their serials."""
    return {s: serial_of(pki.issue(s)) for s in services}


async def test_rotation_under_load_drops_no_request(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path / "pki", services=["echo", "frontend", "probe"])
    async with ProbeUpstream(pki.services["probe"]) as probe, \
            two_sidecars(tmp_path, pki, probe.port) as (front, echo, app), \
            aiohttp.ClientSession() as http:
        load = Load(front.url())
        async with load.running():
            await load.more(50)
            # A broken file (say, a half-done copy) is refused; the current certificate serves on.
            # (written whole, then renamed in: the watcher must not catch a half-written file)
            broken = pki.services["echo"].cert.with_suffix(".tmp")
            broken.write_text("-----BEGIN CERTIFICATE-----\ngarbage\n")
            broken.replace(pki.services["echo"].cert)
            failed = (await echo.wait_for_event("tls_reload_failed"))[0]
            assert failed["error"] == f"{pki.services['echo'].cert}: corrupt PEM certificate"
            await load.more(50)
            for round_ in (1, 2):
                serials = await reissue(pki, "echo", "frontend")
                await asyncio.gather(echo.wait_for_event("tls_reloaded", count=round_),
                                     front.wait_for_event("tls_reloaded", count=round_))
                await load.more(100)
                # New handshakes present the new certificates, on both sides.
                assert await asyncio.to_thread(peer_serial, echo.ports["inbound"],
                                               client_context(pki.services["frontend"])) == serials["echo"]
                async with http.get(front.url() + "/", headers={"Host": "probe"}) as resp:
                    assert resp.status == 200
                assert probe.serials[-1] == serials["frontend"]
        samples = await metrics(echo)
    assert load.failed == [], load.failed[:5]
    assert load.ok >= 250 and app.requests == load.ok
    assert front.events("tls_reloaded")[-1]["serial"] == format(serials["frontend"], "x")
    assert echo.events("tls_reloaded")[-1]["serial"] == format(serials["echo"], "x")
    # The load opened new connections to echo throughout, not only at the start, and most
    # of them resumed a TLS session (the frontend offers one only from its current context).
    full = samples['pake_tls_handshakes_total{resumed="false",side="server"}']
    resumed = samples['pake_tls_handshakes_total{resumed="true",side="server"}']
    assert full + resumed > 20 and resumed > full
    assert samples['pake_tls_reloads_total{result="failed"}'] >= 1


async def test_ca_rotation_with_overlap_under_load_drops_no_request(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path / "pki", services=["echo", "frontend"])
    old_root = pki.ca.certificate
    new_ca = CertificateAuthority.init(tmp_path / "new-ca", "pake.local")
    new_certs = tmp_path / "new-certs"
    async with two_sidecars(tmp_path, pki) as (front, echo, app):
        load = Load(front.url())
        reloads = 0

        async def step() -> None:
            nonlocal reloads
            reloads += 1
            await asyncio.gather(echo.wait_for_event("tls_reloaded", count=reloads),
                                 front.wait_for_event("tls_reloaded", count=reloads))
            await load.more(80)

        async with load.running():
            await load.more(50)
            # 1. both trust old and new roots
            bundle = pki.services["echo"].bundle  # the workloads' bundle file (both use it)
            pem.write_certificates(bundle, [old_root, new_ca.certificate])
            await step()
            # 2. both get certificates from the new CA (the bundle keeps both roots)
            for service in ("echo", "frontend"):
                issued = pki.services[service]
                fresh = new_ca_issue(new_ca, service, new_certs)
                pem.write_atomic(issued.key, fresh.key.read_bytes(), pem.KEY_MODE)
                pem.write_atomic(issued.cert, fresh.cert.read_bytes(), pem.CERT_MODE)
            await step()
            # 3. the old root goes
            pem.write_certificates(bundle, [new_ca.certificate])
            await step()
        # Applied without a restart: a client from the old CA is now refused in the handshake.
        old_client = make_test_pki(tmp_path / "old", services=["frontend"])  # another CA: unknown now
        completed, result = await asyncio.to_thread(
            tls_request, echo.ports["inbound"], tls12(client_context(old_client.services["frontend"])), REQUEST)
        assert not completed, result
        reissued = TlsContextSource(pki.services["frontend"])
        assert reissued.material.bundle.roots == (new_ca.certificate,)
        assert await asyncio.to_thread(peer_serial, echo.ports["inbound"], reissued.client()) \
            == serial_of(pki.services["echo"])
    assert load.failed == [], load.failed[:5]
    assert app.requests == load.ok >= 250


def new_ca_issue(ca: CertificateAuthority, service: str, out: Path) -> TlsFiles:
    from certs.issue import issue_workload

    files = issue_workload(ca, service, out)
    return TlsFiles(files.cert, files.key, files.bundle)


# === start-up errors =====================================================================


async def _start(tmp_path: Path, name: str, files: dict[str, Path], service: str = "echo") -> tuple[int, list[str]]:
    workdir = tmp_path / name
    workdir.mkdir()
    (workdir / "mesh.yaml").write_text("services: {}\n")
    (workdir / "sidecar.yaml").write_text(
        f"service: {service}\nmesh: mesh.yaml\napp: 127.0.0.1:9\n"
        "listeners: {inbound: {address: 127.0.0.1:0, tls: true}}\n"
        f"tls: {{cert: {files['cert']}, key: {files['key']}, bundle: {files['bundle']}}}\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "run", "-c", str(workdir / "sidecar.yaml"), cwd=_ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(20):
        out, err = await proc.communicate()
    assert out == b""
    return proc.returncode or 0, err.decode().splitlines()


async def test_bad_pem_files_stop_start_up_with_one_line(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path / "pki", services=["echo", "billing"])
    good = pki.services["echo"]
    corrupt = tmp_path / "corrupt.pem"
    corrupt.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    garbage_key = tmp_path / "garbage-key.pem"
    garbage_key.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    base = {"cert": good.cert, "key": good.key, "bundle": good.bundle}
    expired = pki.bad("expired", "echo")
    cases = {
        "missing": ({**base, "cert": tmp_path / "nope.pem"}, tmp_path / "nope.pem", "file is missing"),
        "corrupt": ({**base, "cert": corrupt}, corrupt, "corrupt PEM certificate"),
        "corrupt_key": ({**base, "key": garbage_key}, garbage_key, "corrupt or unsupported PEM private key"),
        "unreadable": ({**base, "bundle": tmp_path}, tmp_path, "is a directory"),
        "mismatched": ({**base, "key": pki.services["billing"].key}, pki.services["billing"].key,
                       "private key does not match certificate"),
        "expired": ({"cert": expired.cert, "key": expired.key, "bundle": good.bundle}, expired.cert,
                    "certificate expired at"),
        "other_identity": ({**base, "cert": pki.services["billing"].cert, "key": pki.services["billing"].key},
                           pki.services["billing"].cert,
                           "certificate is for spiffe://pake.local/service/billing, this sidecar is " + ECHO_ID),
    }
    results = await asyncio.gather(*(_start(tmp_path, name, files) for name, (files, _, _) in cases.items()))
    for (name, (_, path, problem)), (code, lines) in zip(cases.items(), results):
        assert code == 2, (name, lines)
        assert len(lines) == 1, (name, lines)
        assert lines[0].startswith(f"pake-sidecar: {path}: "), (name, lines)
        assert problem in lines[0], (name, lines)
