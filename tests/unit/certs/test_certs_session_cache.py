"""Client-side session resumption through asyncio's create_connection."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from certs.identity import workload_identity
from certs.session_cache import ResumingContext, SessionCache
from certs.ssl_context import TlsContextSource
from tests.helpers.pki import MeshPki

Handshake = Callable[..., Awaitable[Any]]
ADDR = ("127.0.0.1", 15006)


async def test_second_connection_resumes_and_keeps_peer_identity(
    pki: MeshPki, handshake: Handshake
) -> None:
    server = TlsContextSource(pki.services["orders"])
    client = TlsContextSource(pki.services["frontend"])
    cache = SessionCache()
    assert cache.context_for(ADDR, client.client()) is client.client()

    first = await handshake(server.server(), client.client())
    assert first.ok and not first.client_resumed
    cache.store(ADDR, client.client(), first.client_session)
    ctx = cache.context_for(ADDR, client.client())
    assert isinstance(ctx, ResumingContext)

    second = await handshake(server.server(), ctx)
    assert second.ok, second
    assert second.client_resumed and second.server_resumed
    # A resumed session still carries the peer certificates, so identity works.
    assert workload_identity(second.client_peer_der, "pake.local", "client").service == "frontend"
    assert workload_identity(second.server_peer_der, "pake.local", "server").service == "orders"


async def test_sessions_are_not_offered_after_a_reload(pki: MeshPki, handshake: Handshake) -> None:
    server = TlsContextSource(pki.services["orders"])
    client = TlsContextSource(pki.services["frontend"])
    cache = SessionCache()
    first = await handshake(server.server(), client.client())
    cache.store(ADDR, client.client(), first.client_session)
    pki.issue("frontend")
    assert client.reload()
    assert cache.context_for(ADDR, client.client()) is client.client()
    assert len(cache) == 0


async def test_cache_is_bounded_and_forgets(pki: MeshPki, handshake: Handshake) -> None:
    server = TlsContextSource(pki.services["orders"])
    client = TlsContextSource(pki.services["frontend"])
    cache = SessionCache(maxsize=2)
    out = await handshake(server.server(), client.client())
    for port in (1, 2, 3):
        cache.store(("127.0.0.1", port), client.client(), out.client_session)
    assert len(cache) == 2
    assert cache.context_for(("127.0.0.1", 1), client.client()) is client.client()  # evicted
    assert isinstance(cache.context_for(("127.0.0.1", 3), client.client()), ResumingContext)
    cache.forget(("127.0.0.1", 3))
    cache.store(("127.0.0.1", 9), client.client(), None)
    assert len(cache) == 1


async def test_expired_sessions_are_dropped(pki: MeshPki, handshake: Handshake) -> None:
    server = TlsContextSource(pki.services["orders"])
    client = TlsContextSource(pki.services["frontend"])
    session = (await handshake(server.server(), client.client())).client_session
    cache = SessionCache(clock=lambda: session.time + session.timeout + 1)
    cache.store(ADDR, client.client(), session)
    assert cache.context_for(ADDR, client.client()) is client.client()


def test_maxsize_must_be_positive() -> None:
    with pytest.raises(ValueError):
        SessionCache(maxsize=0)

