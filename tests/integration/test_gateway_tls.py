"""The gateway listener's server TLS (``listeners.gateway.tls: {cert, key}``) end to end: a
real gateway-mode sidecar process with a server certificate made here with ``cryptography``
(self-signed, SAN ``localhost`` and ``127.0.0.1``), in front of the echo app, every port 0.

Outside clients get TLS >= 1.2 with ALPN http/1.1 and resumable sessions, and are never
asked for a client certificate; a plain-HTTP client gets no HTTP response; the app sees
``X-Forwarded-Proto: https``; replaced files are served from the next handshake on; bad
files stop start-up with one line and exit 2 (the gateway never falls back to plain HTTP).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import shutil
import socket
import ssl
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp.test_utils import TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certs import pem
from examples.echo import make_app
from tests.helpers.sidecar_process import SidecarProcess

_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = _ROOT / "examples" / "gateway"


# === helpers ==============================================================================


def server_certificate(directory: Path, name: str = "server", *,
                       valid: tuple[timedelta, timedelta] = (timedelta(minutes=-1), timedelta(hours=1)),
                       ) -> tuple[Path, Path]:
    """A self-signed server certificate for localhost and 127.0.0.1: (cert, key) paths."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"test gateway {name}")])
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now + valid[0]).not_valid_after(now + valid[1])
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
    pem.write_certificates(cert_path, [cert])
    pem.write_private_key(key_path, key)
    return cert_path, key_path


def trusting(cert: Path) -> ssl.SSLContext:
    """An outside client's context: verifies the gateway by host name against ``cert`` and
    has no certificate of its own."""
    return ssl.create_default_context(cafile=str(cert))


def gateway(tmp_path: Path, app_port: int, cert: Path, key: Path, *, name: str = "gateway") -> SidecarProcess:
    boot = {"service": "gateway", "mode": "gateway",
            "listeners": {"gateway": {"address": "127.0.0.1:0", "tls": {"cert": str(cert), "key": str(key)}},
                          "admin": "127.0.0.1:0"}}
    mesh = {"trust_domain": "pake.local", "services": {
        "gateway": {"routes": [{"name": "all", "match": {"path_prefix": "/"}, "to": [{"service": "app"}]}]},
        "app": {"endpoints": [f"127.0.0.1:{app_port}"], "tls": False}}}
    return SidecarProcess(tmp_path, bootstrap=boot, mesh=mesh, name=name)


def _seen(body: dict[str, Any]) -> dict[str, str]:
    return {k.lower(): v for k, v in body["headers"].items()}


def _handshake(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None,
               ) -> tuple[ssl.SSLSession | None, bool, str | None, str | None, dict[str, Any]]:
    """One blocking HTTPS request (asyncio cannot offer a session): the session to resume
    with, whether this one resumed, ALPN, TLS version and the served certificate."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
        tls.sendall(b"GET /hello HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := tls.recv(65536):  # reading also takes in the TLS 1.3 ticket
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 200 "), reply[:100]
        return (tls.session, tls.session_reused, tls.selected_alpn_protocol(), tls.version(),
                tls.getpeercert())


# === serving ==============================================================================


async def test_https_clients_reach_the_app_with_forwarded_proto_https(tmp_path: Path) -> None:
    cert, key = server_certificate(tmp_path / "tls")
    async with TestServer(make_app(), host="127.0.0.1", port=0) as app, \
            gateway(tmp_path, app.port, cert, key) as gw, aiohttp.ClientSession() as http:
        port = gw.ports["gateway"]
        async with http.get(f"https://localhost:{port}/hello", ssl=trusting(cert)) as resp:
            assert resp.status == 200
            seen = _seen(await resp.json())
        assert seen["x-forwarded-proto"] == "https"
        # by IP address too: the certificate names 127.0.0.1
        async with http.get(f"https://127.0.0.1:{port}/hello", ssl=trusting(cert)) as resp:
            assert resp.status == 200

        # TLS >= 1.2, ALPN http/1.1, no client certificate asked, and tickets: resumption
        offers_h2 = trusting(cert)
        offers_h2.set_alpn_protocols(["h2", "http/1.1"])
        session, reused, alpn, version, peer = await asyncio.to_thread(_handshake, port, offers_h2)
        assert (reused, alpn) == (False, "http/1.1") and version in ("TLSv1.2", "TLSv1.3")
        assert ("DNS", "localhost") in peer["subjectAltName"]
        _, reused, _, _, _ = await asyncio.to_thread(_handshake, port, offers_h2, session)
        assert reused
        tls12 = trusting(cert)
        tls12.maximum_version = ssl.TLSVersion.TLSv1_2  # 1.2 is still served (1.3 preferred)
        _, _, _, version, _ = await asyncio.to_thread(_handshake, port, tls12)
        assert version == "TLSv1.2"

        # /config shows the served certificate's public facts and files, never the key
        async with http.get(gw.admin + "/config") as resp:
            server_tls = (await resp.json())["server_tls"]
        assert server_tls["files"] == {"cert": str(cert), "key": str(key)}
        assert server_tls["subject"] == "CN=test gateway server"
        assert server_tls["serial"] == format(pem.load_certificate(cert).serial_number, "x")
        assert "PRIVATE KEY" not in json.dumps(server_tls)


async def test_plain_http_to_the_tls_port_gets_no_http_response(tmp_path: Path) -> None:
    cert, key = server_certificate(tmp_path / "tls")
    async with TestServer(make_app(), host="127.0.0.1", port=0) as app, \
            gateway(tmp_path, app.port, cert, key) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.ports["gateway"])
        writer.write(b"GET /hello HTTP/1.1\r\nHost: localhost\r\n\r\n")
        try:
            async with asyncio.timeout(10):
                reply = await reader.read()  # until the gateway closes: no fixed wait
        except ConnectionResetError:
            reply = b""
        finally:
            writer.close()
        assert not reply.startswith(b"HTTP/"), reply[:100]
        # and an aiohttp client speaking plain HTTP fails rather than getting a page
        async with aiohttp.ClientSession() as http:
            try:
                async with http.get(f"http://127.0.0.1:{gw.ports['gateway']}/hello") as resp:
                    status: int | None = resp.status
            except aiohttp.ClientError:
                status = None
        assert status is None
    assert not [a for a in gw.events("access") if a.get("path") == "/hello"]  # nothing was proxied


async def test_replaced_certificate_files_are_served_from_the_next_handshake(tmp_path: Path) -> None:
    cert, key = server_certificate(tmp_path / "tls")
    async with TestServer(make_app(), host="127.0.0.1", port=0) as app, \
            gateway(tmp_path, app.port, cert, key) as gw, aiohttp.ClientSession() as http:
        port = gw.ports["gateway"]
        _, _, _, _, first = await asyncio.to_thread(_handshake, port, trusting(cert))
        # a new pair replaces the files (key first, then the certificate: one may see a
        # mismatched pair in between, which is kept out until both fit)
        new_cert, new_key = server_certificate(tmp_path / "new")
        new_key.replace(key)
        new_cert.replace(cert)
        await gw.wait_for_event("gateway_tls_reloaded")
        _, _, _, _, second = await asyncio.to_thread(_handshake, port, trusting(cert))
        assert second["serialNumber"] != first["serialNumber"]
        async with http.get(f"https://localhost:{port}/hello", ssl=trusting(cert)) as resp:
            assert resp.status == 200


def test_the_server_context_asks_no_client_certificate_and_refuses_old_tls(tmp_path: Path) -> None:
    """In process, what a handshake cannot show from outside (OpenSSL's own defaults refuse
    TLS 1.1 clients too): the listener's context is ours, not a default."""
    from sidecar.config.model import ServerTlsFiles
    from sidecar.tls import ServerTls

    cert, key = server_certificate(tmp_path / "tls")
    ctx = ServerTls(ServerTlsFiles(cert, key)).server_context()
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_NONE
    assert not ctx.options & ssl.OP_NO_TICKET


async def test_the_example_tls_form_serves_the_demo_certificate_of_make_certs(tmp_path: Path) -> None:
    """examples/gateway/sidecar.yaml shows its TLS listener commented out: used as it is
    written, with the certificates ``make certs`` makes, it serves HTTPS for localhost."""
    shutil.copytree(EXAMPLE, tmp_path / "gateway")
    certs = tmp_path / "mtls" / "certs"  # where the example's ../mtls/certs/ points
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "examples.certs", "--out", str(certs), cwd=_ROOT,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    text = (EXAMPLE / "sidecar.yaml").read_text()
    form = re.search(r"(?m)^  # gateway:\n  #   address: .+\n  #   tls: .+\n", text)
    assert form, "sidecar.yaml shows the TLS listener form"
    plain = re.search(r"(?m)^  gateway: .+\n", text)
    assert plain
    text = text.replace(plain.group(0), "").replace(form.group(0), form.group(0).replace("# ", ""))
    boot = yaml.safe_load(text)
    assert boot["listeners"]["gateway"]["tls"] == {
        "cert": "../mtls/certs/demo-gateway-server.pem", "key": "../mtls/certs/demo-gateway-server-key.pem"}
    boot["listeners"]["gateway"]["address"] = "127.0.0.1:0"
    boot["listeners"]["admin"] = "127.0.0.1:0"
    mesh = yaml.safe_load((EXAMPLE / "mesh.yaml").read_text())
    async with SidecarProcess(tmp_path, name="gateway", bootstrap=boot, mesh=mesh) as gw, \
            aiohttp.ClientSession() as http:
        demo = trusting(certs / "demo-gateway-server.pem")
        async with http.get(f"https://localhost:{gw.ports['gateway']}/echo/hello", ssl=demo) as resp:
            assert resp.status == 401  # TLS done; no credentials, so the gateway's authn answers


# === start-up refusals ====================================================================


async def _start(tmp_path: Path, name: str, cert: Path, key: Path, command: str = "run") -> tuple[int, bytes, list[str]]:
    workdir = tmp_path / "runs" / name
    workdir.mkdir(parents=True)
    (workdir / "mesh.yaml").write_text("services: {gateway: {}}\n")
    (workdir / "sidecar.yaml").write_text(
        "service: gateway\nmode: gateway\nmesh: mesh.yaml\n"
        f"listeners: {{gateway: {{address: 127.0.0.1:0, tls: {{cert: '{cert}', key: '{key}'}}}}}}\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", command, "-c", str(workdir / "sidecar.yaml"), cwd=_ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(20):
        out, err = await proc.communicate()
    return proc.returncode or 0, out, err.decode().splitlines()


async def test_bad_server_certificate_files_stop_start_up_with_one_line(tmp_path: Path) -> None:
    cert, key = server_certificate(tmp_path / "good")
    _, other_key = server_certificate(tmp_path / "other")
    expired_cert, expired_key = server_certificate(
        tmp_path / "expired", valid=(timedelta(days=-2), timedelta(days=-1)))
    corrupt = tmp_path / "corrupt.pem"
    corrupt.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    not_pem = tmp_path / "not-pem.pem"
    not_pem.write_text("hello\n")
    missing = tmp_path / "nope.pem"
    cases = {
        "missing_cert": (missing, key, missing, "file is missing"),
        "missing_key": (cert, missing, missing, "file is missing"),
        "corrupt_cert": (corrupt, key, corrupt, "corrupt PEM certificate"),
        "not_a_key": (cert, not_pem, not_pem, "not a PEM private key file"),
        "mismatched": (cert, other_key, other_key, "private key does not match certificate"),
        "expired": (expired_cert, expired_key, expired_cert, "certificate expired at"),
        "directory": (tmp_path, key, tmp_path, "is a directory"),
    }
    results = await asyncio.gather(*(_start(tmp_path, name, c, k) for name, (c, k, _, _) in cases.items()))
    for (name, (_, _, path, problem)), (code, out, lines) in zip(cases.items(), results):
        assert code == 2, (name, lines)
        assert out == b"", name  # never "ready": no plain-HTTP fallback
        assert len(lines) == 1, (name, lines)
        assert lines[0].startswith(f"pake-sidecar: {path}: "), (name, lines)
        assert problem in lines[0], (name, lines)
    # `check` finds the same problem without starting anything
    code, _, lines = await _start(tmp_path, "check", corrupt, key, command="check")
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"pake-sidecar: {corrupt}: ")
