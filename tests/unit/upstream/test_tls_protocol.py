"""The TLS layer of the pool and the listeners (``sidecar.upstream.tls_protocol``) against a
real TLS server on loopback: bytes both ways in order, flow control when the peer stops
reading, the ends (the peer's close, ours after what was written, abort), and handshakes
refused or too slow, each reported once."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from sidecar.upstream.tls_protocol import TlsProtocol
from tests.helpers.pki import MeshPki, make_test_pki, unchecked_context

TIMEOUT = 10.0
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Recorder(asyncio.Protocol):
    """A protocol that keeps what arrives (and each read's size) and every call the transport
    makes."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.reads: list[int] = []
        self.events: list[str] = []
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.arrived = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.events.append("made")

    def data_received(self, data: bytes) -> None:
        assert type(data) is bytes  # as uvloop gives a plain connection's reads
        self.received += data
        self.reads.append(len(data))
        self.arrived.set()

    def eof_received(self) -> bool | None:
        self.events.append("eof")
        return None

    def pause_writing(self) -> None:
        self.events.append("pause")

    def resume_writing(self) -> None:
        self.events.append("resume")

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")
        self.lost.set_result(exc)

    async def wait_for(self, size: int) -> None:
        async with asyncio.timeout(TIMEOUT):
            while len(self.received) < size:
                self.arrived.clear()
                await self.arrived.wait()


async def copy_until_eof(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    """A relay's client-to-server direction: everything, then the close."""
    while data := await source.read(65536):
        sink.write(data)
    sink.close()
    await sink.wait_closed()


@pytest.fixture
def pki(tmp_path: Path) -> MeshPki:
    return make_test_pki(tmp_path, ("server", "client"))


@pytest.fixture
async def serve(pki: MeshPki) -> AsyncIterator[Callable[[Handler], Awaitable[int]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> int:
        server = await asyncio.start_server(handler, "127.0.0.1", 0,
                                            ssl=unchecked_context("server", pki.services["server"]))
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    yield start
    for server in servers:
        server.close()


def client_context(pki: MeshPki) -> ssl.SSLContext:
    return unchecked_context("client", pki.services["client"])


async def connect(port: int, protocol: Recorder, pki: MeshPki, *, timeout: float = TIMEOUT,
                  context: ssl.SSLContext | None = None) -> TlsProtocol:
    """As the pool connects: TCP, then the handshake, reported once."""
    loop = asyncio.get_running_loop()
    reports: list[BaseException | None] = []
    done: asyncio.Future[None] = loop.create_future()

    def on_handshake(exc: BaseException | None) -> None:
        reports.append(exc)
        if exc is None:
            done.set_result(None)
        else:
            done.set_exception(exc)

    tls = TlsProtocol(loop, protocol, context or client_context(pki), server_side=False,
                      server_hostname="server", handshake_timeout=timeout, on_handshake=on_handshake)
    await loop.create_connection(lambda: tls, "127.0.0.1", port)
    try:
        async with asyncio.timeout(TIMEOUT):
            await done
    finally:
        await asyncio.sleep(0)
        assert len(reports) == 1, reports
    return tls


async def test_bytes_go_both_ways_in_order_and_close_sends_close_notify(serve, pki) -> None:
    seen_eof = asyncio.get_running_loop().create_future()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        seen_eof.set_result(reader.at_eof())  # the client's close_notify ended the stream
        writer.close()

    protocol = Recorder()
    transport = await connect(await serve(echo), protocol, pki)
    message = os.urandom(300_000)  # several records each way, and reads that fill the buffer
    for i in range(0, len(message), 7_000):
        transport.write(message[i:i + 7_000])
    await protocol.wait_for(len(message))
    assert protocol.received == message
    assert transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
    assert transport.get_extra_info("peername")[0] == "127.0.0.1"
    transport.close()
    assert transport.is_closing()
    transport.write(b"after close")  # dropped, not sent and not an error
    assert await asyncio.wait_for(seen_eof, TIMEOUT) is True
    assert await asyncio.wait_for(protocol.lost, TIMEOUT) is None
    assert protocol.events == ["made", "lost"]


async def test_a_peer_that_stops_reading_pauses_the_writer_and_nothing_is_lost(serve, pki) -> None:
    start_reading = asyncio.Event()
    digest = asyncio.get_running_loop().create_future()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await start_reading.wait()
        sha, total = hashlib.sha256(), 0
        while data := await reader.read(65536):
            sha.update(data)
            total += len(data)
        digest.set_result((total, sha.hexdigest()))
        writer.close()

    protocol = Recorder()
    transport = await connect(await serve(slow), protocol, pki)
    payload = os.urandom(64 * 1024)
    sent = hashlib.sha256()
    for _ in range(128):  # 8 MiB: far past the socket buffers, so the backlog fills
        transport.write(payload)
        sent.update(payload)
    assert protocol.events == ["made", "pause"]
    assert transport.get_write_buffer_size() > 64 * 1024
    start_reading.set()
    async with asyncio.timeout(TIMEOUT):
        while "resume" not in protocol.events:
            await asyncio.sleep(0.01)
    transport.close()  # after what is written: the whole backlog goes out first
    assert await asyncio.wait_for(digest, TIMEOUT) == (128 * len(payload), sent.hexdigest())
    assert await asyncio.wait_for(protocol.lost, TIMEOUT) is None
    assert transport.get_write_buffer_size() == 0


async def test_the_peers_close_is_eof_then_lost(serve, pki) -> None:
    async def answer_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(5)
        writer.write(b"bye")
        await writer.drain()
        writer.close()

    protocol = Recorder()
    transport = await connect(await serve(answer_and_close), protocol, pki)
    transport.write(b"hello")
    assert await asyncio.wait_for(protocol.lost, TIMEOUT) is None
    assert protocol.received == b"bye"
    assert protocol.events == ["made", "eof", "lost"]
    assert transport.is_closing()


async def test_abort_ends_the_connection_at_once(serve, pki) -> None:
    ended = asyncio.get_running_loop().create_future()

    async def wait(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read(65536)
            ended.set_result("eof")
        except (ssl.SSLError, ConnectionError) as exc:  # no close_notify: an unclean end
            ended.set_result(type(exc).__name__)
        writer.close()

    protocol = Recorder()
    transport = await connect(await serve(wait), protocol, pki)
    transport.abort()
    transport.abort()  # twice: still one connection_lost
    assert await asyncio.wait_for(protocol.lost, TIMEOUT) is None
    assert await asyncio.wait_for(ended, TIMEOUT) in ("eof", "SSLError", "ConnectionResetError")
    await asyncio.sleep(0.05)
    assert protocol.events == ["made", "lost"]


async def test_full_records_arrive_whole_one_read_each_and_reading_pauses(serve, pki) -> None:
    async def send_big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"x" * 16_384 + b"y" * 16_384 + b"z")  # two full records and a byte
        await writer.drain()
        await reader.read(1)
        writer.close()

    protocol = Recorder()
    transport = await connect(await serve(send_big), protocol, pki)
    await protocol.wait_for(32_769)
    assert protocol.received == b"x" * 16_384 + b"y" * 16_384 + b"z"
    assert protocol.reads == [16_384, 16_384, 1]  # a record a read: none cut, none joined
    transport.pause_reading()
    assert not transport.is_reading()
    transport.resume_reading()
    assert transport.is_reading()
    transport.close()
    await asyncio.wait_for(protocol.lost, TIMEOUT)


async def test_records_cut_across_reads_and_many_in_one_read_each_arrive_whole(serve, pki) -> None:
    # A read asks OpenSSL for as much as the ciphertext that waits, when that is all that
    # waits, else for a whole record: records cut into pieces by the network, and many small
    # ones in one read, must each come out whole, in order.
    sizes = [16_384, 10, 5_000, 1, 16_384, 300] + [40] * 30

    async def send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for i, size in enumerate(sizes):
            writer.write(bytes([65 + i % 26]) * size)  # a record each (asyncio writes each at once)
            await writer.drain()
        await reader.read(1)
        writer.close()

    server_port = await serve(send)
    chopped = asyncio.get_running_loop().create_future()

    async def chop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # between client and server: the server's bytes in 7-byte pieces, then in bursts
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", server_port)
        pump = asyncio.create_task(copy_until_eof(reader, up_writer))
        sent = 0
        while data := await up_reader.read(65536):
            step = 7 if sent < 40_000 else len(data)
            for i in range(0, len(data), step):
                writer.write(data[i:i + step])
                await writer.drain()
                if step == 7 and i % 700 == 0:
                    await asyncio.sleep(0)
            sent += len(data)
        writer.close()
        await writer.wait_closed()
        await pump
        chopped.set_result(None)

    chopper = await asyncio.start_server(chop, "127.0.0.1", 0)
    try:
        protocol = Recorder()
        transport = await connect(chopper.sockets[0].getsockname()[1], protocol, pki)
        await protocol.wait_for(sum(sizes))
        assert protocol.received == b"".join(bytes([65 + i % 26]) * n for i, n in enumerate(sizes))
        assert protocol.reads == sizes
        transport.close()
        await asyncio.wait_for(chopped, TIMEOUT)  # every socket of the way closed
        await asyncio.wait_for(protocol.lost, TIMEOUT)
    finally:
        chopper.close()
        await chopper.wait_closed()


async def test_a_read_of_one_whole_record_and_reads_of_several_alternate_without_a_stall(serve, pki) -> None:
    # A read that starts at a record and holds exactly one (its header's length is what
    # arrived) is handed on without asking what else waits. Reads of one record, of two, of
    # a record and a half, and of the half's rest come in turn: each record still arrives
    # whole, in order, and none waits for a later read.
    sizes = [100, 200, 300, 4_000, 50, 5_000, 60, 70, 16_384, 80]
    # how many of the data records each write to the client carries, in turn (a write's
    # end half-way into a record leaves the rest to the next one)
    groups = [1, 2, 1, 1.5, 1.5, 1, 1, 1]

    async def send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(1)  # the client's go: after the handshake and its tickets
        for i, size in enumerate(sizes):
            writer.write(bytes([65 + i]) * size)  # a record each
            await writer.drain()
        await reader.read(1)
        writer.close()

    server_port = await serve(send)
    grouping = asyncio.Event()
    relayed = asyncio.get_running_loop().create_future()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", server_port)
        pump = asyncio.create_task(copy_until_eof(reader, up_writer))

        async def record() -> bytes:
            header = await up_reader.readexactly(5)
            return header + await up_reader.readexactly(int.from_bytes(header[3:5]))
        while not grouping.is_set():  # the handshake and the tickets: passed on at once
            got = asyncio.ensure_future(record())
            flag = asyncio.ensure_future(grouping.wait())
            await asyncio.wait({got, flag}, return_when=asyncio.FIRST_COMPLETED)
            flag.cancel()
            if not got.done():
                data_first = await got  # the first data record, read whole
                break
            writer.write(got.result())
            await writer.drain()
        else:
            data_first = await record()
        data = [data_first] + [await record() for _ in sizes[1:]]
        assert [len(r) >= n for r, n in zip(data, sizes)] == [True] * len(sizes)
        stream = b"".join(data)
        at = 0
        index = 0.0
        for count in groups:
            index += count
            whole = int(index)
            end = sum(len(r) for r in data[:whole]) + (len(data[whole]) // 2 if index != whole else 0)
            writer.write(stream[at:end])
            await writer.drain()
            await asyncio.sleep(0.05)  # a read each
            at = end
        assert at == len(stream)
        while rest := await up_reader.read(65536):
            writer.write(rest)
        writer.close()
        await writer.wait_closed()
        await pump
        relayed.set_result(None)

    relayer = await asyncio.start_server(relay, "127.0.0.1", 0)
    try:
        protocol = Recorder()
        transport = await connect(relayer.sockets[0].getsockname()[1], protocol, pki)
        await asyncio.sleep(0.2)  # the server's tickets pass the relay
        grouping.set()
        transport.write(b"g")
        await protocol.wait_for(sum(sizes))
        assert protocol.received == b"".join(bytes([65 + i]) * n for i, n in enumerate(sizes))
        assert protocol.reads == sizes
        transport.close()
        await asyncio.wait_for(relayed, TIMEOUT)  # every socket of the way closed
        await asyncio.wait_for(protocol.lost, TIMEOUT)
    finally:
        relayer.close()
        await relayer.wait_closed()


async def test_an_untrusted_server_is_refused_and_its_socket_closed(serve, pki, tmp_path) -> None:
    other = make_test_pki(tmp_path / "other", ("server",))  # another CA: not in our bundle

    async def never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(never, "127.0.0.1", 0,
                                        ssl=unchecked_context("server", other.services["server"]))
    port = server.sockets[0].getsockname()[1]
    fds = len(os.listdir("/proc/self/fd"))
    protocol = Recorder()
    with pytest.raises(ssl.SSLCertVerificationError):
        await connect(port, protocol, pki)  # (and reported once: see connect)
    async with asyncio.timeout(TIMEOUT):  # (the server's side of it closes on its own time)
        while len(os.listdir("/proc/self/fd")) > fds:
            await asyncio.sleep(0.01)
    assert protocol.events == []
    server.close()


async def test_a_refused_connection_raises_oserror(pki) -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    with pytest.raises(ConnectionRefusedError):
        await connect(port, Recorder(), pki)


async def test_a_handshake_that_never_ends_is_reported_once_as_too_slow(pki) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # reads the ClientHello, never answers
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)  # plain TCP: no TLS at all
    port = server.sockets[0].getsockname()[1]
    protocol = Recorder()
    started = asyncio.get_running_loop().time()
    with pytest.raises(TimeoutError):
        await connect(port, protocol, pki, timeout=0.3)
    assert asyncio.get_running_loop().time() - started < 3
    assert protocol.events == []  # the connection's protocol never saw it
    server.close()


async def test_a_broken_record_ends_the_connection_with_its_error(pki) -> None:
    """A record that does not decrypt (here: bytes written under the TLS layer) ends the
    connection, and connection_lost says why, as uvloop's TLS did."""
    listener = socket.create_server(("127.0.0.1", 0))
    server_context = unchecked_context("server", pki.services["server"])

    def serve_one() -> None:
        sock, _ = listener.accept()
        with server_context.wrap_socket(sock, server_side=True) as tls:
            tls.recv(5)  # after the handshake: the client's first bytes
            with socket.socket(fileno=os.dup(tls.fileno())) as raw:
                raw.sendall(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)  # application data, forged
            time.sleep(0.5)

    thread = threading.Thread(target=serve_one, daemon=True)
    thread.start()
    protocol = Recorder()
    transport = await connect(listener.getsockname()[1], protocol, pki)
    transport.write(b"hello")
    lost = await asyncio.wait_for(protocol.lost, TIMEOUT)
    assert isinstance(lost, ssl.SSLError), lost
    assert protocol.received == b"" and protocol.events == ["made", "lost"]
    thread.join(TIMEOUT)
    listener.close()
