"""Real mTLS handshakes on loopback with the contexts the sidecar uses.

The handshake refuses what the chain check can see (no certificate, other
CA, expired, not yet valid); identity rules the chain check cannot see are
workload_identity's (a chain-valid certificate without a SPIFFE ID passes the
handshake and is then refused by identity).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certs.bundle import TrustBundle
from certs.identity import IdentityError, SpiffeId, workload_identity
from certs.memory_source import MemoryTlsSource, PemMaterial
from certs.pem import PemError
from certs.ssl_context import (
    TlsContextSource,
    TlsFiles,
    client_context,
    load_material,
    presented_chain,
    server_context,
)
from tests.helpers.pki import BadKind, MeshPki, make_test_pki, unchecked_context

# The `handshake` fixture (conftest.py): run_handshake(server_ctx, client_ctx) -> Outcome.
Handshake = Callable[..., Awaitable[Any]]

TD = "pake.local"


def contexts(files: TlsFiles) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    return (
        server_context(files.cert, files.key, files.bundle),
        client_context(files.cert, files.key, files.bundle),
    )


def test_context_settings(pki: MeshPki) -> None:
    server, client = contexts(pki.services["orders"])
    for ctx in (server, client):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.verify_flags & ssl.VERIFY_X509_STRICT
        assert not ctx.options & ssl.OP_NO_TICKET
    assert server.protocol == ssl.PROTOCOL_TLS_SERVER
    assert client.protocol == ssl.PROTOCOL_TLS_CLIENT
    assert client.check_hostname is False


async def test_mutual_tls_identifies_both_sides(pki: MeshPki, handshake: Handshake) -> None:
    server, _ = contexts(pki.services["orders"])
    _, client = contexts(pki.services["frontend"])
    out = await handshake(server, client)
    assert out.ok, out
    assert out.alpn == "http/1.1"
    assert workload_identity(out.client_peer_der, TD, "client") == SpiffeId(TD, "frontend")
    assert workload_identity(out.server_peer_der, TD, "server") == SpiffeId(TD, "orders")


async def test_a_mesh_server_sends_one_session_ticket_per_handshake(pki: MeshPki) -> None:
    """One TLS 1.3 ticket per handshake (OpenSSL sends two; each costs both sides ~1.9M
    instructions): enough for a client that keeps one session per endpoint to resume
    (``tests/integration/test_tls_resumption.py``)."""
    server, _ = contexts(pki.services["orders"])
    _, client = contexts(pki.services["frontend"])
    tickets: list[int] = []

    def on_message(conn: object, direction: str, version: object, content_type: object,
                   msg_type: object, data: bytes) -> None:
        if direction == "read" and msg_type == ssl._TLSMessageType.NEWSESSION_TICKET:
            tickets.append(1)

    client._msg_callback = on_message  # type: ignore[attr-defined]  # OpenSSL's message hook

    def client_saw(ssl_object: ssl.SSLObject) -> None:
        assert ssl_object.version() == "TLSv1.3" and tickets == [1]
        assert ssl_object.session is not None and ssl_object.session.has_ticket

    await _ping(server, client, client_saw=client_saw)


async def _ping(server: ssl.SSLContext, client: ssl.SSLContext, *,
                server_saw: Callable[[ssl.SSLObject], None] | None = None,
                client_saw: Callable[[ssl.SSLObject], None] | None = None) -> None:
    """One handshake and a 4-byte echo over it. The client reads on until the server closes,
    so every post-handshake message (a ticket) has arrived when ``client_saw`` looks."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if server_saw is not None:
            server_saw(writer.get_extra_info("ssl_object"))
        writer.write(await reader.readexactly(4))
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=server)
    port = srv.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client,
                                                       server_hostname="orders")
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        await reader.read()
        if client_saw is not None:
            client_saw(writer.get_extra_info("ssl_object"))
        writer.close()
    finally:
        srv.close()
        await srv.wait_closed()


async def test_tls12_only_client_still_works(pki: MeshPki, handshake: Handshake) -> None:
    server, _ = contexts(pki.services["orders"])
    _, client = contexts(pki.services["frontend"])
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    assert (await handshake(server, client)).ok


async def test_server_refuses_client_without_certificate(
    pki: MeshPki, handshake: Handshake
) -> None:
    server, _ = contexts(pki.services["orders"])
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.check_hostname = False
    anonymous.load_verify_locations(cafile=pki.bundle)
    out = await handshake(server, anonymous)
    assert isinstance(out.server_error, ssl.SSLError), out
    assert "did not return a certificate" in str(out.server_error)
    assert out.client_peer_der is None and out.reply == b""


@pytest.mark.parametrize(
    ("kind", "why"),
    [
        ("other_ca", "unable to get local issuer certificate"),
        ("expired", "certificate has expired"),
        ("not_yet_valid", "certificate is not yet valid"),
    ],
)
async def test_server_refuses_bad_client_chain(
    pki: MeshPki, handshake: Handshake, kind: BadKind, why: str
) -> None:
    server, _ = contexts(pki.services["orders"])
    client = unchecked_context("client", pki.bad(kind, "frontend"))
    out = await handshake(server, client)
    assert isinstance(out.server_error, ssl.SSLCertVerificationError), out
    assert why in str(out.server_error)
    assert out.client_peer_der is None and out.reply == b""


@pytest.mark.parametrize("kind", ["other_ca", "expired"])
async def test_client_refuses_bad_server_chain(
    pki: MeshPki, handshake: Handshake, kind: BadKind
) -> None:
    server = unchecked_context("server", pki.bad(kind, "orders"))
    _, client = contexts(pki.services["frontend"])
    out = await handshake(server, client)
    assert isinstance(out.client_error, ssl.SSLCertVerificationError), out
    assert out.server_error is not None


@pytest.mark.parametrize(
    ("kind", "reason"),
    [("no_uri_san", "no_uri_san"), ("two_uri_sans", "multiple_uri_sans"),
     ("wrong_trust_domain", "wrong_trust_domain"), ("no_client_auth", "no_client_auth")],
)
async def test_chain_valid_but_identity_refused(
    pki: MeshPki, handshake: Handshake, kind: BadKind, reason: str
) -> None:
    server, _ = contexts(pki.services["orders"])
    client = unchecked_context("client", pki.bad(kind, "frontend"))
    out = await handshake(server, client)
    if kind == "no_client_auth":
        # OpenSSL checks the EKU purpose of a client certificate too; the
        # identity check is the second line (see test_certs_identity).
        assert "unsuitable certificate purpose" in str(out.server_error)
        return
    assert out.ok, out
    with pytest.raises(IdentityError) as info:
        workload_identity(out.client_peer_der, TD, "client")
    assert info.value.reason == reason


async def test_intermediate_chain_handshakes(
    pki_intermediate: MeshPki, handshake: Handshake
) -> None:
    server, _ = contexts(pki_intermediate.services["orders"])
    _, client = contexts(pki_intermediate.services["frontend"])
    assert len(TrustBundle.load(pki_intermediate.bundle).roots) == 1  # the root only
    out = await handshake(server, client)
    assert out.ok, out
    assert workload_identity(out.client_peer_der, TD, "client").service == "frontend"


async def test_bundle_with_two_roots_accepts_leaves_of_both(
    tmp_path: Path, handshake: Handshake
) -> None:
    old = make_test_pki(tmp_path / "old", services=("orders", "frontend"))
    new = make_test_pki(tmp_path / "new", services=("frontend",))
    both = tmp_path / "both.pem"
    TrustBundle.merge_files([old.bundle, new.bundle]).write(both)
    orders = old.services["orders"]
    server = server_context(orders.cert, orders.key, both)
    for pki in (old, new):
        files = pki.services["frontend"]
        client = client_context(files.cert, files.key, both)
        out = await handshake(server, client)
        assert out.ok, out
    # And the old bundle alone refuses the new CA's leaf.
    server_old_only = server_context(orders.cert, orders.key, old.bundle)
    files = new.services["frontend"]
    out = await handshake(server_old_only, client_context(files.cert, files.key, both))
    assert out.server_error is not None


def _pem_certs(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def test_without_the_mode_a_leaf_alone_is_presented_with_its_root(pki: MeshPki) -> None:
    """Where OpenSSL cannot be told not to build a chain, it is loaded as leaf and root, what
    OpenSSL would otherwise build from the trust store on every handshake."""
    files = pki.services["orders"]
    (leaf,) = _pem_certs(files.cert)
    (root,) = _pem_certs(files.bundle)
    assert presented_chain(load_material(files)) == (leaf, root)


def test_a_chain_with_intermediates_is_presented_as_given(pki_intermediate: MeshPki) -> None:
    files = pki_intermediate.services["orders"]
    given = _pem_certs(files.cert)
    assert len(given) == 2  # leaf and intermediate; the root stays with the peer
    assert presented_chain(load_material(files)) == tuple(given)


def test_the_root_presented_is_the_one_that_signed_among_same_named(tmp_path: Path) -> None:
    """A rotation's bundle holds the old and the new root under the same name: the leaf's
    signature, not its issuer name, picks the root."""
    old = make_test_pki(tmp_path / "old", services=("orders",))
    new = make_test_pki(tmp_path / "new", services=("orders",))
    (old_root,), (new_root,) = _pem_certs(old.bundle), _pem_certs(new.bundle)
    assert old_root.subject == new_root.subject
    both = tmp_path / "both.pem"
    TrustBundle.merge_files([old.bundle, new.bundle]).write(both)
    files = new.services["orders"]
    chain = presented_chain(load_material(TlsFiles(files.cert, files.key, both)))
    assert chain == (*_pem_certs(files.cert), new_root)


def test_a_leaf_whose_issuer_is_not_in_the_bundle_is_presented_alone(tmp_path: Path) -> None:
    ours = make_test_pki(tmp_path / "ours", services=("orders",))
    other = make_test_pki(tmp_path / "other", services=())
    files = ours.services["orders"]
    material = load_material(TlsFiles(files.cert, files.key, other.bundle))
    assert presented_chain(material) == tuple(_pem_certs(files.cert))


async def _chains_sent(server: ssl.SSLContext, client: ssl.SSLContext) -> dict[str, list[bytes]]:
    """The certificates each side received from the other in one handshake, as DER."""
    got: dict[str, list[bytes]] = {}

    def der_chain(ssl_object: ssl.SSLObject) -> list[bytes]:
        sent = ssl_object._sslobj.get_unverified_chain()  # type: ignore[attr-defined]  # 3.13: public
        return [c.public_bytes(ssl._ssl.ENCODING_DER) for c in sent]  # type: ignore[attr-defined]

    await _ping(server, client,
                server_saw=lambda ssl_object: got.update({"client sent": der_chain(ssl_object)}),
                client_saw=lambda ssl_object: got.update({"server sent": der_chain(ssl_object)}))
    return got


def _der(path: Path) -> list[bytes]:
    return [c.public_bytes(serialization.Encoding.DER) for c in _pem_certs(path)]


async def test_both_sides_send_their_leaf_alone(pki: MeshPki) -> None:
    """The peer holds the root: OpenSSL neither builds a chain from the trust store at every
    handshake nor sends the root (a quarter of a new connection's instructions)."""
    got = await _chains_sent(contexts(pki.services["orders"])[0],
                             contexts(pki.services["frontend"])[1])
    assert got["server sent"] == _der(pki.services["orders"].cert)
    assert got["client sent"] == _der(pki.services["frontend"].cert)
    assert len(got["server sent"]) == 1


async def test_a_dispatcher_and_a_memory_source_send_the_leaf_alone(pki: MeshPki) -> None:
    """The listener's dispatcher (its mode is the connection's: OpenSSL copies it before the
    SNI callback switches contexts) and a joined sidecar's contexts, built from PEM bytes."""
    files = pki.services["orders"]
    dispatcher = TlsContextSource(files).server_dispatcher()
    got = await _chains_sent(dispatcher, contexts(pki.services["frontend"])[1])
    assert got["server sent"] == _der(files.cert)
    held = PemMaterial(files.cert.read_bytes(), files.key.read_bytes(), files.bundle.read_bytes())
    memory = MemoryTlsSource(held, files)
    got = await _chains_sent(memory.server_dispatcher(), memory.client())
    assert got["server sent"] == got["client sent"] == _der(files.cert)


async def test_a_chain_with_an_intermediate_is_sent_as_given(pki_intermediate: MeshPki) -> None:
    got = await _chains_sent(contexts(pki_intermediate.services["orders"])[0],
                             contexts(pki_intermediate.services["frontend"])[1])
    sent = got["server sent"]
    assert sent == _der(pki_intermediate.services["orders"].cert) and len(sent) == 2


async def test_intermediates_from_the_bundle_are_still_sent_the_root_is_not(
    pki_intermediate: MeshPki, tmp_path: Path
) -> None:
    """A leaf alone whose intermediate is in our bundle: OpenSSL used to find it there and send
    it (with the root); a peer whose bundle holds only the root still needs it."""
    files = pki_intermediate.services["orders"]
    leaf, intermediate = _pem_certs(files.cert)
    leaf_only, ours = tmp_path / "leaf.pem", tmp_path / "ours.pem"
    leaf_only.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    TrustBundle.merge_files([pki_intermediate.bundle, pki_intermediate.ca_dir / "ca.pem"]).write(ours)
    _, root_only = contexts(pki_intermediate.services["frontend"])  # its bundle: the root alone
    got = await _chains_sent(server_context(leaf_only, files.key, ours), root_only)
    assert got["server sent"] == _der(files.cert)  # leaf and intermediate


async def test_without_memfd_the_identity_loads_through_a_private_temporary_file(
    pki: MeshPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where there is no ``os.memfd_create`` (not Linux), chain and key go through a private
    temporary directory, removed after the load; the contexts work the same."""
    import tempfile

    made: list[Path] = []
    real = tempfile.TemporaryDirectory

    def recording(*args: Any, **kwargs: Any) -> tempfile.TemporaryDirectory[str]:
        directory = real(*args, **kwargs)
        made.append(Path(directory.name))
        return directory

    monkeypatch.delattr(os, "memfd_create")
    monkeypatch.setattr(tempfile, "TemporaryDirectory", recording)
    files = pki.services["orders"]
    held = PemMaterial(files.cert.read_bytes(), files.key.read_bytes(), files.bundle.read_bytes())
    memory = MemoryTlsSource(held, files)  # the key goes to the file too
    got = await _chains_sent(contexts(pki.services["orders"])[0], memory.client())
    assert got["server sent"] == got["client sent"] == _der(files.cert)
    assert made and not any(d.exists() for d in made)


# === loading errors name the file ===


def test_missing_key_names_the_file(pki: MeshPki) -> None:
    files = pki.services["orders"]
    files.key.unlink()
    with pytest.raises(PemError) as info:
        server_context(files.cert, files.key, files.bundle)
    assert str(info.value) == f"{files.key}: file is missing"


def test_mismatched_key_names_both(pki: MeshPki) -> None:
    orders, frontend = pki.services["orders"], pki.services["frontend"]
    with pytest.raises(PemError) as info:
        client_context(orders.cert, frontend.key, orders.bundle)
    assert str(info.value) == (
        f"{frontend.key}: private key does not match certificate {orders.cert}"
    )


def test_corrupt_bundle_names_it(pki: MeshPki, tmp_path: Path) -> None:
    files = pki.services["orders"]
    bad = tmp_path / "bundle.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    with pytest.raises(PemError, match=f"^{bad}: corrupt PEM certificate$"):
        server_context(files.cert, files.key, bad)


@pytest.mark.parametrize(
    ("kind", "problem"),
    [("expired", "certificate expired at"), ("not_yet_valid", "not valid until"),
     ("no_uri_san", "exactly one SPIFFE ID URI SAN"), ("not_spiffe", "not a workload SPIFFE ID")],
)
def test_own_certificate_must_be_usable(pki: MeshPki, kind: BadKind, problem: str) -> None:
    files = pki.bad(kind)
    with pytest.raises(PemError, match=f"^{files.cert}: .*{problem}"):
        load_material(files)


# === TlsContextSource ===


def test_source_info_never_contains_the_key(pki: MeshPki) -> None:
    files = pki.services["orders"]
    source = TlsContextSource(files)
    info = source.info()
    assert info["spiffe_id"] == "spiffe://pake.local/service/orders"
    assert info["subject"] == "CN=orders"
    assert int(info["serial"], 16) > 0
    assert 3500 < info["seconds_to_expiry"] <= 3600
    assert info["files"]["key"] == str(files.key)
    assert source.spiffe_id == SpiffeId(TD, "orders")
    dumped = json.dumps(info)
    assert "PRIVATE" not in dumped
    assert files.key.read_text().splitlines()[1] not in dumped


def test_reload_without_change_keeps_contexts(pki: MeshPki) -> None:
    source = TlsContextSource(pki.services["orders"])
    server, client = source.server(), source.client()
    assert source.reload() is False
    assert source.server() is server and source.client() is client


async def test_reload_swaps_contexts_for_new_handshakes_only(
    pki: MeshPki, handshake: Handshake
) -> None:
    orders = pki.services["orders"]
    source = TlsContextSource(orders)
    old_serial = source.info()["serial"]
    old_server = source.server()
    _, client = contexts(pki.services["frontend"])

    pki.issue("orders")  # renew in place: same paths, new key and certificate
    assert source.reload() is True
    assert source.server() is not old_server
    assert source.info()["serial"] != old_serial

    # The sidecar picks the context per connection, so the next handshake shows the new cert.
    out = await handshake(old_server, client, server_ctx_factory=source.server)
    assert out.ok, out
    new_leaf = workload_identity(out.server_peer_der, TD, "server")
    assert new_leaf.service == "orders"
    served = x509.load_der_x509_certificate(out.server_peer_der)
    assert format(served.serial_number, "x") == source.info()["serial"]


async def test_reload_failure_keeps_old_contexts(pki: MeshPki, handshake: Handshake) -> None:
    orders = pki.services["orders"]
    source = TlsContextSource(orders)
    server, client = source.server(), source.client()
    orders.cert.write_text("-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
    with pytest.raises(PemError, match=f"^{orders.cert}: corrupt"):
        source.reload()
    assert source.server() is server and source.client() is client
    _, frontend = contexts(pki.services["frontend"])
    assert (await handshake(source.server(), frontend)).ok


def test_reload_during_non_atomic_rotation(pki: MeshPki, tmp_path: Path) -> None:
    orders = pki.services["orders"]
    source = TlsContextSource(orders)
    renewed = pki.issue("orders", out_dir=tmp_path / "renewed")
    orders.key.write_bytes(renewed.key.read_bytes())  # key first, cert not yet
    with pytest.raises(PemError, match="private key does not match"):
        source.reload()
    orders.cert.write_bytes(renewed.cert.read_bytes())
    assert source.reload() is True
    assert source.info()["serial"] == TlsContextSource(renewed).info()["serial"]


def test_source_construction_fails_clearly(pki: MeshPki, tmp_path: Path) -> None:
    files = TlsFiles(tmp_path / "missing.pem", pki.services["orders"].key, pki.bundle)
    with pytest.raises(PemError, match=f"^{tmp_path / 'missing.pem'}: file is missing$"):
        TlsContextSource(files)


# === server_dispatcher: rotation for create_server(ssl=...) listeners ===


async def _serve_once(
    server_ssl: ssl.SSLContext, client: ssl.SSLContext
) -> tuple[bytes | None, bytes]:
    """One exchange against asyncio.start_server(ssl=...): (server cert DER, reply)."""
    seen: list[bytes | None] = []

    async def on_accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(writer.get_extra_info("ssl_object").getpeercert(binary_form=True))
        with contextlib.suppress(OSError, ConnectionError, asyncio.IncompleteReadError):
            await reader.readexactly(4)
            writer.write(b"pong")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(on_accept, "127.0.0.1", 0, ssl=server_ssl)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname=""), 5
        )
        served = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.write(b"ping")
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(4), 5)
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError, ConnectionError):
            await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()
    assert seen and seen[0] is not None  # the client certificate was required and seen
    return served, reply


async def _dispatcher_follows_reloads(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path / "pki", services=("orders", "frontend"))
    source = TlsContextSource(pki.services["orders"])
    dispatcher = source.server_dispatcher()
    client = TlsContextSource(pki.services["frontend"]).client()
    for _ in range(2):
        served, reply = await _serve_once(dispatcher, client)
        assert reply == b"pong"
        assert format(x509.load_der_x509_certificate(served).serial_number, "x") == (
            source.info()["serial"]
        )
        pki.issue("orders")
        assert source.reload()
    # A bundle change applies too: a client of a new CA is trusted after reload.
    new = make_test_pki(tmp_path / "new", services=("frontend",))
    TrustBundle.merge_files([pki.bundle, new.bundle]).write(pki.services["orders"].bundle)
    assert source.reload()
    new_client = TlsContextSource(new.services["frontend"]).client()
    new_client.load_verify_locations(cafile=pki.bundle)  # and it trusts our server
    served, reply = await _serve_once(dispatcher, new_client)
    assert reply == b"pong"


async def test_server_dispatcher_follows_reloads(tmp_path: Path) -> None:
    await _dispatcher_follows_reloads(tmp_path)


def test_server_dispatcher_follows_reloads_on_uvloop(tmp_path: Path) -> None:
    uvloop = pytest.importorskip("uvloop")
    # The sidecar runs on uvloop, whose TLS transport is its own implementation.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_dispatcher_follows_reloads(tmp_path))
