"""MemoryTlsSource: an identity held in memory, swapped in place (the joined sidecar's TLS)."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
from cryptography import x509

from certs import pem
from certs.memory_source import MemoryTlsSource, PemMaterial
from certs.ssl_context import TlsFiles
from tests.helpers.pki import MeshPki, unchecked_context


def held(files: TlsFiles) -> PemMaterial:
    return PemMaterial(files.cert.read_bytes(), files.key.read_bytes(), files.bundle.read_bytes())


def shown(tmp_path: Path) -> TlsFiles:
    return TlsFiles(tmp_path / "state" / "cert.pem", tmp_path / "state" / "key.pem",
                    tmp_path / "state" / "bundle.pem")


def serial(ssl_object: ssl.SSLObject) -> int:
    der = ssl_object.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def test_a_renewal_applies_to_new_handshakes_and_drops_no_open_connection(pki: MeshPki, tmp_path: Path) -> None:
    first = pki.services["orders"]
    source = MemoryTlsSource(held(first), shown(tmp_path))
    assert source.spiffe_id.service == "orders" and source.reload() is False

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(100):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=source.server_dispatcher())
    port = server.sockets[0].getsockname()[1]
    client = unchecked_context("client", pki.services["frontend"])
    try:
        r1, w1 = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname="")
        assert serial(w1.get_extra_info("ssl_object")) == pem.load_certificate(first.cert).serial_number

        renewed = pki.issue("orders", out_dir=tmp_path / "renewed")  # a new key, a new certificate
        assert source.update(held(renewed)) is True
        assert source.update(held(renewed)) is False  # the same identity again: nothing swapped

        r2, w2 = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname="")
        assert serial(w2.get_extra_info("ssl_object")) == pem.load_certificate(renewed.cert).serial_number
        for reader, writer in ((r1, w1), (r2, w2)):  # the connection from before still works
            writer.write(b"ping")
            await writer.drain()
            assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
            writer.close()
    finally:
        server.close()
        await server.wait_closed()


def test_an_unusable_update_names_the_part_and_keeps_the_current_identity(pki: MeshPki, tmp_path: Path) -> None:
    source = MemoryTlsSource(held(pki.services["orders"]), shown(tmp_path))
    before = source.material.digest
    other = held(pki.services["frontend"])
    with pytest.raises(pem.PemError) as err:
        source.update(PemMaterial(source.held.chain, other.key, source.held.bundle))
    assert str(err.value) == f"{shown(tmp_path).key}: private key does not match certificate {shown(tmp_path).cert}"
    assert source.material.digest == before
    assert "PRIVATE" not in repr(source.held) and "key=" not in repr(source.held)
