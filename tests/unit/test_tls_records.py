"""The wire's TLS record helpers (``sidecar/http/_tls_records.c``) against ``_ssl``'s own
methods, on real TLS 1.3 sessions over memory BIOs: the same bytes, the same ends, the same
errors, where only the GIL's round trip is gone. The compiled form only (the pure form calls
the methods)."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.http import wire
from tests.helpers.pki import make_test_pki, unchecked_context

pytestmark = pytest.mark.skipif(wire.TLS_READ is None, reason="the pure form calls _ssl's methods")


class Pair:
    """A client and a server session, handshaken, each over its two memory BIOs."""

    def __init__(self, client: ssl.SSLContext, server: ssl.SSLContext) -> None:
        self.c_in, self.c_out, self.s_in, self.s_out = (ssl.MemoryBIO() for _ in range(4))
        self.client = client.wrap_bio(self.c_in, self.c_out)
        self.server = server.wrap_bio(self.s_in, self.s_out, server_side=True)
        for _ in range(10):
            for end, incoming, outgoing in ((self.client, self.c_in, self.s_out), (self.server, self.s_in, self.c_out)):
                incoming.write(outgoing.read())
                try:
                    end.do_handshake()
                except ssl.SSLWantReadError:
                    pass
        self.c_in.write(self.s_out.read())  # the session tickets
        with pytest.raises(ssl.SSLWantReadError):
            self.client.read(1)

    @property
    def c(self) -> Any:
        return getattr(self.client, "_sslobj")  # the _ssl._SSLSocket, what tls_protocol hands over

    @property
    def s(self) -> Any:
        return getattr(self.server, "_sslobj")

    def to_server(self) -> bytes:
        records = self.c_out.read()
        self.s_in.write(records)
        return records


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    pki = make_test_pki(tmp_path_factory.mktemp("pki"), services=["front", "up"])
    client = unchecked_context("client", pki.services["front"])
    client.minimum_version = ssl.TLSVersion.TLSv1_3
    return client, unchecked_context("server", pki.services["up"])


@pytest.fixture
def pairs(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> Iterator[tuple[Pair, Pair]]:
    """Two sessions alike: one read through the helpers, one through ``_ssl``'s methods."""
    yield Pair(*contexts), Pair(*contexts)


def test_the_helpers_call_openssl_themselves_for_an_ssl_object(pairs: tuple[Pair, Pair]) -> None:
    fast, _ = pairs
    assert wire.TLS_READ is not None and wire.TLS_WRITE is not None
    records = getattr(wire, "_C").tls_records
    assert records(fast.c) == ""
    assert records(fast.server) != ""  # ssl.SSLObject, the Python wrapper: its methods are called


def test_records_written_and_read_are_what_the_methods_write_and_read(pairs: tuple[Pair, Pair]) -> None:
    fast, slow = pairs
    assert wire.TLS_READ is not None and wire.TLS_WRITE is not None
    message = b"GET / HTTP/1.1\r\nhost: up\r\n\r\n" * 40  # ~1.2 KiB, one record
    for pair, write in ((fast, lambda data: wire.TLS_WRITE(fast.c, data)), (slow, slow.c.write)):
        assert write(message) == len(message)
        assert write(memoryview(message)[:7]) == 7  # any buffer, as the method takes
        pair.to_server()
    # a read asks for more than a record holds and gets the record; for less, the rest next
    assert wire.TLS_READ(fast.s, 16384) == slow.s.read(16384) == message
    assert wire.TLS_READ(fast.s, 3) == slow.s.read(3) == b"GET"
    assert wire.TLS_READ(fast.s, 16384) == slow.s.read(16384) == b" / H"
    for read in (lambda: wire.TLS_READ(fast.s, 16384), lambda: slow.s.read(16384)):
        with pytest.raises(ssl.SSLWantReadError):  # nothing waits
            read()


def test_a_record_not_whole_yet_wants_more_and_is_read_once_it_is(pairs: tuple[Pair, Pair]) -> None:
    fast, _ = pairs
    assert wire.TLS_READ is not None and wire.TLS_WRITE is not None
    wire.TLS_WRITE(fast.c, b"x" * 5000)
    records = fast.c_out.read()
    fast.s_in.write(records[:100])
    with pytest.raises(ssl.SSLWantReadError):
        wire.TLS_READ(fast.s, 16384)
    fast.s_in.write(records[100:])
    assert wire.TLS_READ(fast.s, 16384) == b"x" * 5000


def test_a_close_notify_reads_as_nothing_as_through_the_method(pairs: tuple[Pair, Pair]) -> None:
    fast, slow = pairs
    assert wire.TLS_READ is not None
    for pair in (fast, slow):
        with pytest.raises(ssl.SSLWantReadError):
            pair.client.unwrap()  # sends close_notify, waits for the server's
        pair.to_server()
    assert wire.TLS_READ(fast.s, 16384) == slow.s.read(16384) == b""
    assert wire.TLS_READ(fast.s, 16384) == b""  # and again


def test_a_tampered_record_raises_the_error_the_method_raises(pairs: tuple[Pair, Pair]) -> None:
    """OpenSSL's error comes through ``_ssl``: the helper leaves the error queue as the failed
    call left it, and the method's call again gets the same."""
    fast, slow = pairs
    assert wire.TLS_READ is not None and wire.TLS_WRITE is not None
    errors = []
    for pair, read in ((fast, lambda: wire.TLS_READ(fast.s, 16384)), (slow, lambda: slow.s.read(16384))):
        pair.client.write(b"secret")
        records = bytearray(pair.c_out.read())
        records[-1] ^= 0x01  # the AEAD tag
        pair.s_in.write(bytes(records))
        with pytest.raises(ssl.SSLError) as caught:
            read()
        errors.append((type(caught.value), caught.value.reason, caught.value.library))
        with pytest.raises(ssl.SSLError):  # the session is over
            read()
    assert errors[0] == errors[1]
    assert errors[0][1] is not None


def test_anything_else_is_the_objects_own_method() -> None:
    """An object that is no ``_ssl._SSLSocket`` (a wrapper, another TLS library's) gets its
    own ``read`` and ``write`` called, and the helpers say why."""
    assert wire.TLS_READ is not None and wire.TLS_WRITE is not None

    class Records:
        def __init__(self) -> None:
            self.calls: list[tuple[str, object]] = []

        def read(self, n: int) -> bytes:
            self.calls.append(("read", n))
            return b"r" * min(n, 2)

        def write(self, data: bytes) -> int:
            self.calls.append(("write", bytes(data)))
            return len(data)

    records = Records()
    assert wire.TLS_READ(records, 5) == b"rr"
    assert wire.TLS_WRITE(records, b"abc") == 3
    assert records.calls == [("read", 5), ("write", b"abc")]
    assert "_SSLSocket" in getattr(wire, "_C").tls_records(records)
    with pytest.raises(TypeError):
        wire.TLS_READ(records, "5")  # type: ignore[arg-type]


def outcome(call: Callable[[], object]) -> object:
    """What a call did: its result, or its exception's type, reason, library and message."""
    try:
        return ("ok", call())
    except Exception as exc:  # noqa: BLE001 - what the method does, whatever it is
        return (type(exc).__name__, getattr(exc, "reason", None), getattr(exc, "library", None), str(exc))


def alike(contexts: tuple[ssl.SSLContext, ssl.SSLContext],
          scenario: Callable[[Pair, Callable[[Any, int], bytes], Callable[[Any, bytes], int]], list[object]]) -> None:
    """The scenario on two fresh sessions, through the helpers and through the methods: the
    same outcomes, call by call."""
    assert wire.TLS_READ is not None and wire.TLS_WRITE is not None
    fast = scenario(Pair(*contexts), wire.TLS_READ, wire.TLS_WRITE)
    slow = scenario(Pair(*contexts), lambda obj, n: obj.read(n), lambda obj, data: obj.write(data))
    assert fast == slow


def test_the_ends_of_a_session_are_the_methods_ends(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    """A close_notify after ours (both shutdown flags: _ssl raises, where one alone reads as
    nothing), the peer's fatal alert, the transport's end mid-session and mid-record, a write
    after a close, nothing to read or write: each is what ``_ssl``'s methods make of it."""
    def both_closed(p: Pair, read: Callable[[Any, int], bytes], write: Callable[[Any, bytes], int]) -> list[object]:
        with pytest.raises(ssl.SSLWantReadError):
            p.server.unwrap()
        p.c_in.write(p.s_out.read())
        p.client.unwrap()  # answers the server's close_notify with its own
        p.to_server()
        return [outcome(lambda: read(p.s, 100)), outcome(lambda: read(p.s, 100)), outcome(lambda: write(p.s, b"x"))]

    def fatal_alert(p: Pair, read: Callable[[Any, int], bytes], write: Callable[[Any, bytes], int]) -> list[object]:
        p.server.write(b"hello")
        records = bytearray(p.s_out.read())
        records[-1] ^= 0x01
        p.c_in.write(bytes(records))
        with pytest.raises(ssl.SSLError):
            p.client.read(100)  # the client answers with a fatal alert
        p.to_server()
        return [outcome(lambda: read(p.s, 100)), outcome(lambda: read(p.s, 100)), outcome(lambda: write(p.s, b"x"))]

    def eof(p: Pair, read: Callable[[Any, int], bytes], write: Callable[[Any, bytes], int]) -> list[object]:
        p.s_in.write_eof()
        return [outcome(lambda: read(p.s, 100)), outcome(lambda: read(p.s, 100))]

    def eof_mid_record(p: Pair, read: Callable[[Any, int], bytes], write: Callable[[Any, bytes], int]) -> list[object]:
        p.client.write(b"x" * 3000)
        p.s_in.write(p.c_out.read()[:50])
        first = outcome(lambda: read(p.s, 100))
        p.s_in.write_eof()
        return [first, outcome(lambda: read(p.s, 100))]

    def nothing(p: Pair, read: Callable[[Any, int], bytes], write: Callable[[Any, bytes], int]) -> list[object]:
        return [outcome(lambda: read(p.s, 0)), outcome(lambda: read(p.s, -1)), outcome(lambda: write(p.c, b""))]

    for scenario in (both_closed, fatal_alert, eof, eof_mid_record, nothing):
        alike(contexts, scenario)


def test_a_sockets_ssl_object_is_left_to_its_methods(
        contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    """A socket's SSL reads the socket and may wait for it: ``_ssl`` gives the GIL up
    meanwhile, and so must a read here, or a thread that would send the bytes never runs."""
    assert wire.TLS_READ is not None
    client_context, server_context = contexts
    a, b = socket.socketpair()
    served: dict[str, ssl.SSLSocket] = {}
    thread = threading.Thread(target=lambda: served.update(s=server_context.wrap_socket(b, server_side=True)))
    thread.start()
    client = client_context.wrap_socket(a)
    thread.join()
    try:
        native = getattr(client, "_sslobj")
        assert "memory BIOs" in getattr(wire, "_C").tls_records(native)
        sender = threading.Timer(0.2, lambda: served["s"].write(b"late"))
        sender.start()
        assert wire.TLS_READ(native, 100) == b"late"  # waited for, the GIL given up
        sender.join()
    finally:
        client.close()
        served["s"].close()


def test_a_context_with_a_message_callback_is_read_through_the_methods(
        contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    """A message callback (``SSLContext._msg_callback``, a debugging hook) may raise after a
    record: ``_ssl`` raises it from the read or write that ran it, the helpers would not, so
    a TLS connection whose context has one reads and writes through the methods."""
    from sidecar.upstream.tls_protocol import TlsProtocol

    client_context, _ = contexts
    loop = asyncio.new_event_loop()
    try:
        def made() -> TlsProtocol:
            return TlsProtocol(loop, asyncio.Protocol(), client_context, server_side=False,
                               handshake_timeout=1.0, on_handshake=lambda exc: None)

        assert getattr(made(), "_records") is True
        client_context._msg_callback = lambda *args: None  # type: ignore[attr-defined]
        try:
            assert getattr(made(), "_records") is False
        finally:
            client_context._msg_callback = None  # type: ignore[attr-defined]
    finally:
        loop.close()


def test_a_mesh_hops_tls_goes_through_the_helpers() -> None:
    """``tls_protocol`` (the pool's and the listeners' TLS) reads and writes its records so."""
    from sidecar.upstream import tls_protocol

    assert getattr(tls_protocol, "_TLS_READ") is wire.TLS_READ
    assert getattr(tls_protocol, "_TLS_WRITE") is wire.TLS_WRITE
