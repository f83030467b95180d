"""Fixtures for the certs tests: a test PKI, and a real TLS handshake on loopback.

`handshake(server_ctx, client_ctx)` runs one exchange the way the sidecar
does it: a plain TCP accept, then `start_tls` with the server context, so a
context swapped in between connections is the one used.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.pki import MeshPki, make_test_pki

HANDSHAKE_TIMEOUT = 5.0


@dataclass(frozen=True)
class Outcome:
    """What each side saw. A refused handshake has a server_error."""

    server_error: BaseException | None
    client_error: BaseException | None
    client_peer_der: bytes | None  # the client's certificate, as the server saw it
    server_peer_der: bytes | None  # the server's certificate, as the client saw it
    alpn: str | None
    reply: bytes
    client_resumed: bool
    server_resumed: bool
    client_session: ssl.SSLSession | None

    @property
    def ok(self) -> bool:
        return self.server_error is None and self.client_error is None and self.reply == b"pong"


Handshake = Callable[..., Awaitable[Outcome]]


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError, ConnectionError):
        await writer.wait_closed()


async def run_handshake(
    server_ctx: ssl.SSLContext,
    client_ctx: object,
    *,
    server_ctx_factory: Callable[[], ssl.SSLContext] | None = None,
) -> Outcome:
    loop = asyncio.get_running_loop()
    server_done: asyncio.Future[tuple[BaseException | None, bytes | None, bool]] = (
        loop.create_future()
    )

    async def on_accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            ctx = server_ctx_factory() if server_ctx_factory else server_ctx
            await writer.start_tls(ctx)
            ssl_object = writer.get_extra_info("ssl_object")
            peer = ssl_object.getpeercert(binary_form=True)
            resumed = ssl_object.session_reused
            await reader.readexactly(4)
            writer.write(b"pong")
            await writer.drain()
            # Keep the connection until the client closes, so TLS 1.3 tickets
            # reach it before EOF.
            await reader.read()
            server_done.set_result((None, peer, resumed))
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError, ConnectionError) as exc:
            if not server_done.done():
                server_done.set_result((exc, None, False))
        finally:
            await _close(writer)

    server = await asyncio.start_server(on_accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client_error: BaseException | None = None
    server_peer = alpn = None
    reply = b""
    client_resumed = False
    session = None
    try:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port, ssl=client_ctx, server_hostname=""),
                HANDSHAKE_TIMEOUT,
            )
        except (OSError, ssl.SSLError, ConnectionError) as exc:
            client_error = exc
        else:
            try:
                ssl_object = writer.get_extra_info("ssl_object")
                server_peer = ssl_object.getpeercert(binary_form=True)
                alpn = ssl_object.selected_alpn_protocol()
                client_resumed = ssl_object.session_reused
                writer.write(b"ping")
                await writer.drain()
                reply = await asyncio.wait_for(reader.read(4), HANDSHAKE_TIMEOUT)
                session = ssl_object.session
            except (OSError, ssl.SSLError, ConnectionError) as exc:
                client_error = exc
            finally:
                await _close(writer)
        server_error, client_peer, server_resumed = await asyncio.wait_for(
            server_done, HANDSHAKE_TIMEOUT
        )
    finally:
        server.close()
        await server.wait_closed()
    return Outcome(
        server_error,
        client_error,
        client_peer,
        server_peer,
        alpn,
        reply,
        client_resumed,
        server_resumed,
        session,
    )


@pytest.fixture
def handshake() -> Handshake:
    return run_handshake


@pytest.fixture
def pki(tmp_path: Path) -> MeshPki:
    return make_test_pki(tmp_path / "pki", services=("frontend", "orders"))


@pytest.fixture
def pki_intermediate(tmp_path: Path) -> MeshPki:
    return make_test_pki(tmp_path / "pki-int", services=("frontend", "orders"), intermediate=True)
