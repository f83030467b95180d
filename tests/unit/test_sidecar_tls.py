"""sidecar.tls in-process: real handshakes over memory BIOs (no sockets, no loop), counted by
the SSLObject class the sidecar installs, with certificates from make_test_pki."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from certs.ssl_context import TlsContextSource
from tests.helpers.pki import make_test_pki, unchecked_context
from sidecar.tls import SidecarTls


def handshake(client: ssl.SSLContext, server: ssl.SSLContext,
              session: ssl.SSLSession | None = None) -> tuple[ssl.SSLObject, ssl.SSLError | None]:
    """Drive both ends until both are done or one fails; the client's end and the error."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname="echo.pake.local", session=session)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = [False, False]
    for _ in range(10):
        for i, (obj, bio_in, peer_out) in enumerate(((c, c_in, s_out), (s, s_in, c_out))):
            if done[i]:
                continue
            bio_in.write(peer_out.read())
            try:
                obj.do_handshake()
                done[i] = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                return c, exc
        if all(done):
            c_in.write(s_out.read())  # the server's session tickets, sent after its Finished
            try:
                c.read(1)
            except ssl.SSLWantReadError:
                pass
            return c, None
    raise AssertionError("handshake did not finish")


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def pki(tmp_path: Path):  # type: ignore[no-untyped-def]
    return make_test_pki(tmp_path, services=["echo", "frontend"])


@pytest.mark.parametrize(("kind", "reason"), [
    ("other_ca", "unknown_ca"), ("expired", "cert_expired"), ("not_yet_valid", "cert_not_yet_valid"),
    ("no_client_auth", "bad_purpose")])
def test_a_refused_client_certificate_is_counted_with_its_reason(pki, kind: str, reason: str) -> None:  # type: ignore[no-untyped-def]
    registry = CollectorRegistry()
    tls = SidecarTls(TlsContextSource(pki.services["echo"]), "pake.local", "echo", registry)
    _, error = handshake(unchecked_context("client", pki.bad(kind)), tls.server_context())
    assert error is not None
    assert sample(registry, "pake_tls_handshake_failures_total", side="server", reason=reason) == 1
    assert sample(registry, "pake_tls_handshakes_total", side="server", resumed="false") == 0


def test_no_client_certificate_is_counted(pki) -> None:  # type: ignore[no-untyped-def]
    registry = CollectorRegistry()
    tls = SidecarTls(TlsContextSource(pki.services["echo"]), "pake.local", "echo", registry)
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.check_hostname = False
    bare.load_verify_locations(pki.bundle)
    _, error = handshake(bare, tls.server_context())
    assert error is not None
    assert sample(registry, "pake_tls_handshake_failures_total", side="server",
                  reason="no_peer_certificate") == 1


def test_handshakes_are_counted_on_both_sides_fresh_and_resumed(pki) -> None:  # type: ignore[no-untyped-def]
    registry = CollectorRegistry()
    server = SidecarTls(TlsContextSource(pki.services["echo"]), "pake.local", "echo", registry)
    client_registry = CollectorRegistry()
    client = SidecarTls(TlsContextSource(pki.services["frontend"]), "pake.local", "frontend",
                        client_registry)
    listener = server.server_context()  # one per listener: its keys seal the session tickets
    first, error = handshake(client.client_context(), listener)
    assert error is None and not first.session_reused
    again, error = handshake(client.client_context(), listener, session=first.session)
    assert error is None and again.session_reused
    assert sample(registry, "pake_tls_handshakes_total", side="server", resumed="false") == 1
    assert sample(registry, "pake_tls_handshakes_total", side="server", resumed="true") == 1
    assert sample(client_registry, "pake_tls_handshakes_total", side="client", resumed="false") == 1
    assert sample(client_registry, "pake_tls_handshakes_total", side="client", resumed="true") == 1


def test_info_and_expiry_show_the_certificate_never_the_key(pki) -> None:  # type: ignore[no-untyped-def]
    registry = CollectorRegistry()
    tls = SidecarTls(TlsContextSource(pki.services["echo"]), "pake.local", "echo", registry)
    info = tls.info()
    assert info["spiffe_id"] == "spiffe://pake.local/service/echo" and info["subject"] == "CN=echo"
    key_body = pki.services["echo"].key.read_text().splitlines()[1]
    assert "PRIVATE KEY" not in repr(info) and key_body not in repr(info)
    assert 3500 < sample(registry, "pake_tls_certificate_expiry_seconds") <= 3600
