"""The downstream connection's bounds, on a fake transport (no sockets): however many
pipelined requests one read carries, at most ``max_pipelined`` wait behind the one being
answered; the rest stays unparsed bytes until earlier exchanges finish, and every request
is still answered, in order."""

from __future__ import annotations

import asyncio
import gc
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio

from sidecar.config.model import DownstreamTimeouts, Limits, MeshConfig
from sidecar.errors import DownstreamProtocolError, LocalReply
from sidecar.http.request_parser import RequestParser
from sidecar.listener.connection import DownstreamConnection, ListenerContext, ServerState
from sidecar.listener.stream import Stream
from sidecar.snapshot_slot import SnapshotSlot
from sidecar.routing.route_table import RouteTable
from sidecar.snapshot import Snapshot


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.writes = 0
        self.reading = True
        self.closing = False

    def write(self, data: Any) -> None:
        self.out += data
        self.writes += 1

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default


@dataclass
class FakePipeline:
    """Holds every exchange it is given until the test answers it (a blocked upstream)."""

    started: list[Stream] = field(default_factory=list)
    errors: list[DownstreamProtocolError] = field(default_factory=list)

    def start(self, stream: Stream) -> None:
        self.started.append(stream)

    def answer(self, stream: Stream) -> None:
        stream.finished = True
        stream.send_local_reply(LocalReply(200, "ok", stream.head.path, "-"), "svc")
        stream.conn.stream_done(stream)

    def refuse(self, stream: Stream, reply: LocalReply) -> None:
        stream.finished = True
        stream.send_local_reply(reply, "svc")
        stream.conn.stream_done(stream)


@dataclass
class Conn:
    conn: DownstreamConnection
    transport: FakeTransport
    pipeline: FakePipeline

    def responses(self) -> list[str]:
        """The paths answered, in the order the responses were written."""
        text = bytes(self.transport.out).decode()
        return [part.split('"detail":"', 1)[1].split('"', 1)[0] for part in text.split("HTTP/1.1 ")[1:]]


@pytest_asyncio.fixture
async def make() -> AsyncIterator[Any]:
    loop = asyncio.get_running_loop()
    made: list[DownstreamConnection] = []

    mesh = MeshConfig(trust_domain="pake.local")
    snapshots = SnapshotSlot()
    snapshots.set(Snapshot(version="t", mesh=mesh, routes=RouteTable.build(mesh), local_service=None))

    def build(max_pipelined: int = 16) -> Conn:
        pipeline = FakePipeline()
        ctx = ListenerContext(
            name="outbound", service="svc", limits=Limits(max_pipelined=max_pipelined),
            timeouts=DownstreamTimeouts(), state=ServerState(), start=pipeline.start,
            abort=lambda stream: None, refuse=pipeline.refuse, snapshots=snapshots,
            on_protocol_error=lambda conn, exc: pipeline.errors.append(exc))
        conn = DownstreamConnection(ctx, loop)
        transport = FakeTransport()
        conn.connection_made(transport)
        made.append(conn)
        return Conn(conn, transport, pipeline)

    yield build
    for conn in made:
        conn.connection_lost(None)


def tiny(i: int) -> bytes:
    return b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i


def live_streams() -> int:
    return sum(1 for o in gc.get_objects() if type(o) is Stream)


async def test_one_read_of_thousands_of_pipelined_requests_parses_only_up_to_the_limit(make: Any) -> None:
    c = make(max_pipelined=16)
    data = b"".join(tiny(i) for i in range(9000))
    c.conn.data_received(data)
    assert len(c.conn.streams) == 17, "one being answered and max_pipelined waiting"
    assert live_streams() <= 17
    assert not c.transport.reading, "reading pauses while unparsed bytes are held"
    assert len(c.pipeline.started) == 1
    answered = 0
    while c.conn.streams:  # the upstream answers, one exchange at a time
        assert len(c.conn.streams) <= 17
        c.pipeline.answer(c.pipeline.started[answered])
        answered += 1
    assert answered == 9000
    assert c.responses() == [f"/{i}" for i in range(9000)], "every request answered, in order"
    assert c.transport.reading, "once all held bytes are parsed, reading resumes"


async def test_the_bound_holds_however_the_bytes_are_split(make: Any) -> None:
    rng = random.Random(8)
    bodies = [b"", b"x" * 40, b"\r\n\r\n" * 20]
    requests = []
    for i in range(400):
        body = bodies[i % 3]
        if i % 5 == 4:  # chunked, with blank lines inside the data
            requests.append(b"POST /%d HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"%x\r\n%s\r\n0\r\n\r\n" % (i, len(body) + 1, body + b"y"))
        else:
            requests.append(b"POST /%d HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%s"
                            % (i, len(body), body))
    data = b"\r\n".join(requests)  # (CRLFs between messages are allowed and counted)
    for max_pipelined in (1, 3, 16):
        c = make(max_pipelined=max_pipelined)
        pos, answered = 0, 0
        while pos < len(data) or c.conn.streams:
            if pos < len(data) and c.transport.reading:
                step = rng.choice((1, 2, 3, 17, 300, 5000))
                c.conn.data_received(data[pos:pos + step])
                pos += step
            elif c.conn.streams:
                assert c.conn.streams[0].body_done or c.transport.reading
                c.pipeline.answer(c.pipeline.started[answered])
                answered += 1
            assert len(c.conn.streams) <= max_pipelined + 1
        assert not c.pipeline.errors
        assert c.responses() == [f"/{i}" for i in range(400)]


async def test_a_framing_error_in_held_bytes_is_found_when_they_are_parsed(make: Any) -> None:
    c = make(max_pipelined=2)
    c.conn.data_received(b"".join(tiny(i) for i in range(5)) + b"GET /bad HTTP/1.1\r\nHost: a\r\nX_Y: 1\r\n\r\n")
    assert len(c.conn.streams) == 3 and not c.pipeline.errors
    answered = 0
    while not c.pipeline.errors:
        c.pipeline.answer(c.pipeline.started[answered])
        answered += 1
    assert c.pipeline.errors[0].status == 400 and c.transport.closing
    assert "/bad" not in [s.head.path for s in c.pipeline.started], "the bad request went nowhere"
    assert c.responses() == [f"/{i}" for i in range(answered)]


@pytest.mark.parametrize("heads", [1, 2, 5, 17])
def test_head_room_never_lets_more_heads_complete(heads: int) -> None:
    """Fed up to ``head_room``, a parser completes at most ``heads`` heads, for any split
    (17: the default room, where reads of many header lines but few heads take the quick
    answer of a newline count)."""
    rng = random.Random(heads)
    many = b"".join(b"X-H%d: v\r\n" % n for n in range(40))
    data = b"\r\n".join(
        b"GET / HTTP/1.1\r\nHost:a\r\n\r\n" if i % 3 == 0 and i % 2 else
        b"GET /many HTTP/1.1\r\nHost: a\r\n" + many + b"\r\n" if i % 3 == 0 else
        b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 8\r\n\r\n\r\n\r\n\r\n\r\n" if i % 3 == 1 else
        b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n\r\n\r\n\r\n0\r\n\r\n"
        for i in range(200)) + b"\r\nGET / HTTP/1.0\r\n\r\n"

    class Count:
        n = 0

        def on_request(self, head: object) -> None:
            self.n += 1

        def on_body(self, chunk: bytes) -> None:
            pass

        def on_request_end(self) -> None:
            pass

    sink = Count()
    parser = RequestParser(sink, Limits())
    pos = 0
    while pos < len(data):
        read = data[pos:pos + rng.choice((1, 5, 19, 64, 1000))]
        at = 0
        while at < len(read):
            before = sink.n
            stop = parser.head_room(read, at, len(read), heads)
            assert stop > at
            parser.feed(read[at:stop])
            assert sink.n - before <= heads
            at = stop
        pos += len(read)
    assert sink.n == 201


@pytest.mark.parametrize("pieces", [1, 2, 3, 4, 500])
async def test_corked_writes_leave_as_one_write_in_order(make: Any, pieces: int) -> None:
    """What one upstream read brings (a response's head, its body, many small chunks) goes
    downstream in one write, whole and in order, however many pieces it came in."""
    c = make()
    sent = [b"piece %d;" % i for i in range(pieces)]
    for _ in range(2):  # a second gathering starts empty: nothing of the first is sent again
        c.conn.cork()
        for data in sent:
            c.conn.write(data)
        assert c.transport.writes == 0, "nothing leaves while corked"
        c.conn.uncork()
        assert c.transport.writes == 1
        assert bytes(c.transport.out) == b"".join(sent)
        c.transport.out.clear()
        c.transport.writes = 0
    c.conn.write(b"uncorked")
    assert (c.transport.writes, bytes(c.transport.out)) == (1, b"uncorked"), "an uncorked write leaves at once"


async def test_writes_corked_when_the_connection_closes_leave_before_it(make: Any) -> None:
    c = make()
    c.conn.cork()
    c.conn.write(b"head;")
    c.conn.write(b"body")
    c.conn.close()
    assert bytes(c.transport.out) == b"head;body"
    assert c.transport.closing


async def test_an_exchange_s_request_id_is_the_one_its_head_forwards(make: Any) -> None:
    """A request without a usable id gets one: the head forwards it as bytes, and the
    exchange's text of it (log lines, spans, replies) is the same id, made once when asked.
    A caller's valid id is kept, and an invalid one replaced, not forwarded beside ours."""
    c = make()
    c.conn.data_received(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n"
                          b"GET /b HTTP/1.1\r\nHost: a\r\nX-Request-ID: caller-1\r\n\r\n"
                          b"GET /c HTTP/1.1\r\nHost: a\r\nX-Request-ID: bad id\r\n\r\n")
    made, kept, replaced = c.conn.streams
    for stream in (made, replaced):
        raw = stream.head.request_id
        assert raw is not None and len(raw) == 32 and int(raw, 16) >= 0
        assert stream.exchange.request_id == raw.decode()
        assert stream.exchange.request_id is stream.exchange.request_id  # made once
        assert [v for n, v in stream.head.headers if n.lower() == b"x-request-id"] == [raw]
    assert made.head.request_id != replaced.head.request_id
    assert kept.head.request_id == b"caller-1" and kept.exchange.request_id == "caller-1"
