"""HTTP/1.1 proxying through a real sidecar, as a client and an upstream see it (issue 2).

One sidecar serves most of the module: its outbound listener routes by Host to the echo app
(``echo``) and to raw upstreams that each play one part: ``rec`` records bytes and counts
connections, ``hoppy`` answers with hop-by-hop headers, ``coded`` with a gzip transfer
coding, ``silent`` never answers (route timeout 300 ms), ``dead`` is a bound port nobody
listens on (connect timeout 500 ms), ``legacy`` answers close-delimited, ``flaky`` closes a
kept-alive connection when the next request arrives. Its inbound listener forwards to the echo app. Limits and downstream
timeouts get sidecars of their own.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httptools
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from examples.echo import make_app
from tests.helpers.sidecar_process import SidecarProcess
from tests.helpers.upstreams import RecordingUpstream

pytestmark = pytest.mark.asyncio(loop_scope="module")

TIMEOUT = 10.0
MiB = 1024 * 1024


# === a raw HTTP/1.1 client =====================================================================


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    framing: str  # how the body was delimited: "length", "chunked", "close" or "none"

    def header(self, name: str) -> str | None:
        values = self.headers_named(name)
        assert len(values) <= 1, f"{name} appears {len(values)} times: {self.headers}"
        return values[0] if values else None

    def headers_named(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]

    def json(self) -> Any:
        return json.loads(self.body)

    def echoed_headers(self) -> dict[str, str]:
        """The request headers the echo app saw (names lower-cased: aiohttp normalises them)."""
        return {k.lower(): v for k, v in self.json()["headers"].items()}


class Client:
    """One downstream connection; requests are written raw, responses parsed strictly."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        return cls(reader, writer)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.writer.close()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, *, head_only: bool = False, timeout: float = TIMEOUT) -> Response:
        async with asyncio.timeout(timeout):
            head = await self.reader.readuntil(b"\r\n\r\n")
            status_line, *lines = head[:-4].decode("latin-1").split("\r\n")
            version, status, _ = (status_line + " ").split(" ", 2)
            assert version == "HTTP/1.1", status_line
            headers = []
            for line in lines:
                name, sep, value = line.partition(":")
                assert sep and name == name.strip(), f"malformed header line {line!r}"
                headers.append((name.lower(), value.strip()))
            response = Response(int(status), headers, b"", "none")
            if head_only or response.status in (204, 304) or response.status < 200:
                return response
            length = response.header("content-length")
            if response.header("transfer-encoding") is not None:
                assert length is None, "Content-Length and Transfer-Encoding together"
                assert response.header("transfer-encoding") == "chunked"
                response.body, response.framing = await self._chunked(), "chunked"
            elif length is not None:
                response.body, response.framing = await self.reader.readexactly(int(length)), "length"
            else:
                response.body, response.framing = await self.reader.read(), "close"
            return response

    async def _chunked(self) -> bytes:
        body = bytearray()
        while True:
            line = await self.reader.readuntil(b"\r\n")
            assert re.fullmatch(rb"[0-9a-f]+\r\n", line), f"bad chunk-size line {line!r}"
            size = int(line, 16)
            if size == 0:
                assert await self.reader.readexactly(2) == b"\r\n", "trailers after the last chunk"
                return bytes(body)
            body += await self.reader.readexactly(size)
            assert await self.reader.readexactly(2) == b"\r\n"

    async def closed(self, timeout: float = TIMEOUT) -> bytes:
        """Wait for the sidecar to close; returns whatever arrived before the close."""
        async with asyncio.timeout(timeout):
            try:
                return await self.reader.read()
            except ConnectionResetError:
                return b""

    async def exchange(self, data: bytes, **kwargs: Any) -> Response:
        await self.send(data)
        return await self.response(**kwargs)


def request(method: str, path: str, host: str | None = "echo", headers: Iterable[tuple[str, str]] = (),
            body: bytes | None = None, version: str = "1.1") -> bytes:
    lines = [f"{method} {path} HTTP/{version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += [f"{k}: {v}" for k, v in headers]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


async def wait_until(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """Poll a condition the test cannot await directly (a counter in another process)."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


# === scripted raw upstreams ======================================================================


@dataclass
class Seen:
    connection: int  # 1-based, in accept order
    nth: int  # 0-based index of this request on its connection
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes


Script = Callable[[Seen], "tuple[bytes, bool]"]  # -> response bytes (b"": none), close after


class _ScriptedConn(asyncio.Protocol):
    def __init__(self, owner: ScriptedUpstream) -> None:
        self.owner = owner
        owner.connections += 1
        self.number = owner.connections
        self.nth = 0
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self._reset()

    def _reset(self) -> None:
        self.url = b""
        self.headers: list[tuple[str, str]] = []
        self.body = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.owner.open.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.open.discard(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode().lower(), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        seen = Seen(self.number, self.nth, self.parser.get_method().decode(), self.url.decode(),
                    self.headers, self.body)
        self.nth += 1
        self._reset()
        self.owner.seen.append(seen)
        answer, close = self.owner.script(seen)
        assert self.transport is not None
        if answer:
            self.transport.write(answer)
        if close:
            self.transport.close()


class ScriptedUpstream:
    """A raw HTTP/1.1 server on 127.0.0.1:0 that answers each request as ``script`` says."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.seen: list[Seen] = []
        self.connections = 0
        self.open: set[_ScriptedConn] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def __aenter__(self) -> ScriptedUpstream:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _ScriptedConn(self), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for conn in list(self.open):
            assert conn.transport is not None
            conn.transport.close()
        await self.server.wait_closed()


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
LEGACY_BODY = b"".join(b"line %05d of a body that ends when the connection does\n" % i for i in range(2000))


def never_answer(seen: Seen) -> tuple[bytes, bool]:
    return b"", False


def close_delimited(seen: Seen) -> tuple[bytes, bool]:
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n" + LEGACY_BODY, True


def closes_kept_alive_connections(seen: Seen) -> tuple[bytes, bool]:
    """Answer the first request of a connection; close on the next one without answering, as
    an upstream does when its keep-alive timer fires just as a request arrives."""
    if seen.nth == 0 and seen.path != "/always-close":
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(seen.body) + 3, b"ok " + seen.body), False
    return b"", True


CODED_RESPONSE = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\n\x1f\x8b\x08\x00\x00\r\n0\r\n\r\n"
HOP_RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: X-Resp-Hop\r\nX-Resp-Hop: secret\r\n"
                b"Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTrailer: X-T\r\n"
                b"X-End-To-End: kept\r\n\r\nok")


# === the module's mesh ===========================================================================


@dataclass
class Env:
    sc: SidecarProcess
    echo: TestServer
    rec: RecordingUpstream
    hoppy: RecordingUpstream
    coded: RecordingUpstream
    silent: ScriptedUpstream
    legacy: ScriptedUpstream
    flaky: ScriptedUpstream
    dead_port: int
    http: aiohttp.ClientSession = field(repr=False)

    @property
    def port(self) -> int:
        return self.sc.ports["outbound"]

    def access(self, path: str) -> list[dict[str, Any]]:
        return [a for a in self.sc.events("access") if a["path"] == path]

    async def access_for(self, path: str, count: int = 1) -> list[dict[str, Any]]:
        """The access log lines of ``path``, once ``count`` were written."""
        async with asyncio.timeout(TIMEOUT):
            while len(self.access(path)) < count:
                await self.sc.wait_for_event("access", count=len(self.sc.events("access")) + 1)
        return self.access(path)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    dead = socket.socket()  # bound, never listening: connecting is refused, and no one else gets the port
    dead.bind(("127.0.0.1", 0))
    async with TestServer(make_app(), host="127.0.0.1", port=0) as echo, \
            RecordingUpstream() as rec, RecordingUpstream(HOP_RESPONSE) as hoppy, \
            RecordingUpstream(CODED_RESPONSE) as coded, \
            ScriptedUpstream(never_answer) as silent, ScriptedUpstream(close_delimited) as legacy, \
            ScriptedUpstream(closes_kept_alive_connections) as flaky:
        services = {
            "echo": {"endpoints": [f"127.0.0.1:{echo.port}"]},
            "rec": {"endpoints": [rec.address]},
            "hoppy": {"endpoints": [hoppy.address]},
            "coded": {"endpoints": [coded.address], "retries": {"attempts": 0}},
            "silent": {"endpoints": [silent.address], "timeouts": {"route": "300ms"}},
            # retries off: what is tested is the data plane's own rule, not the retry policy
            "dead": {"endpoints": [f"127.0.0.1:{dead.getsockname()[1]}"], "timeouts": {"connect": "500ms"},
                     "retries": {"attempts": 0}},
            "legacy": {"endpoints": [legacy.address]},
            "flaky": {"endpoints": [flaky.address], "retries": {"attempts": 0}},
        }
        boot = {"service": "echo", "app": f"127.0.0.1:{echo.port}",
                "listeners": {"outbound": "127.0.0.1:0", "inbound": {"address": "127.0.0.1:0", "tls": False},
                              "admin": "127.0.0.1:0"}}
        try:
            async with SidecarProcess(tmp_path_factory.mktemp("proxying"), bootstrap=boot,
                                      mesh={"services": services}) as sc, aiohttp.ClientSession() as http:
                yield Env(sc, echo, rec, hoppy, coded, silent, legacy, flaky, dead.getsockname()[1], http)
        finally:
            dead.close()


def upstream_headers(raw: bytes) -> list[tuple[str, str]]:
    """The header lines of the last request in a RecordingUpstream's bytes."""
    head = raw[raw.rindex(b" HTTP/1.1\r\n"):].partition(b"\r\n\r\n")[0].decode("latin-1")
    return [(n.lower(), v.strip()) for n, _, v in (line.partition(":") for line in head.split("\r\n")[1:])]


# === keep-alive and pipelining ==================================================================


async def test_keep_alive_reuses_connections_on_both_sides(env: Env) -> None:
    before = env.rec.connections
    async with await Client.open(env.port) as client:
        for i in range(50):
            response = await client.exchange(request("GET", f"/ka/{i}", host="rec"))
            assert (response.status, response.body, response.header("connection")) == (200, b"ok", None)
    assert env.rec.connections - before <= 1, "one upstream connection serves the whole keep-alive run"

    async def run(n: int) -> None:
        async with await Client.open(env.port) as client:
            for i in range(25):
                assert (await client.exchange(request("GET", f"/ka/{n}/{i}", host="rec"))).status == 200

    await asyncio.gather(*(run(n) for n in range(4)))
    assert env.rec.connections - before <= 4, "four concurrent clients need at most four upstream connections"


async def test_pipelined_requests_are_answered_in_order(env: Env) -> None:
    # more than max_pipelined (16), a slow big response first, a body in the middle
    requests = [request("GET", "/stream?bytes=300000")]
    requests += [request("GET", f"/p/{i}") for i in range(18)]
    requests.insert(5, request("POST", "/p/with-body", body=b"pipelined body"))
    async with await Client.open(env.port) as client:
        await client.send(b"".join(requests))
        first = await client.response()
        assert first.status == 200 and first.body == b"x" * 300000
        paths = [(await client.response()).json() for _ in requests[1:]]
    assert [p["path"] for p in paths] == [f"/p/{i}" for i in range(4)] + ["/p/with-body"] + \
        [f"/p/{i}" for i in range(4, 18)]
    assert paths[4]["body"] == "pipelined body"


@pytest.mark.parametrize("after", [b"", b"GET /p/never HTTP/1.1\r\nHost: ec"])
async def test_a_client_that_half_closes_gets_its_responses_then_the_connection_closes(
        env: Env, after: bytes) -> None:
    """A client that sends its requests and then its FIN (``shutdown(SHUT_WR)``, or a plain
    close) gets every response it asked for, and then the sidecar closes at once, not after
    the idle timeout (60 s): a client gone mid-request holds no connection slot and no
    descriptor. A head begun before the FIN will never end: it is dropped."""
    async with await Client.open(env.port) as client:
        await client.send(request("GET", "/stream?bytes=300000") + request("GET", "/p/after") + after)
        client.writer.write_eof()
        started = time.monotonic()
        first, second = await client.response(), await client.response()
        assert first.status == 200 and len(first.body) == 300000
        assert second.json()["path"] == "/p/after"
        assert await asyncio.wait_for(client.reader.read(), TIMEOUT) == b""
        assert time.monotonic() - started < 5
    assert not env.access("/p/never")


async def test_a_large_pipelined_head_after_a_chunked_request_is_answered(env: Env) -> None:
    """The next request's bytes in the same read are not chunk extensions of the one before."""
    data = (b"POST /p/chunked HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            + request("GET", "/p/cookie", headers=[("Cookie", "c" * 6000)]))
    async with await Client.open(env.port) as client:
        await client.send(data)
        assert (await client.response()).json()["body"] == "hello"
        assert (await client.response()).json()["path"] == "/p/cookie"


# === bodies and framing ==========================================================================


async def test_content_length_and_chunked_bodies_both_ways(env: Env) -> None:
    async with await Client.open(env.port) as client:
        # Content-Length up, Content-Length down
        response = await client.exchange(request("POST", "/cl", body=b"hello world"))
        assert response.framing == "length" and response.status == 200
        assert response.json()["body"] == "hello world"
        headers = response.echoed_headers()
        assert headers["content-length"] == "11" and "transfer-encoding" not in headers
        # chunked up, in pieces that arrive apart
        await client.send(b"POST /chunked HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in (b"hello", b" ", b"chunked world"):
            await client.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        await client.send(b"0\r\n\r\n")
        response = await client.response()
        assert response.json()["body"] == "hello chunked world"
        headers = response.echoed_headers()
        assert headers["transfer-encoding"] == "chunked" and "content-length" not in headers
        # chunked down, re-chunked by the sidecar
        response = await client.exchange(request("GET", "/stream?bytes=200000"))
        assert response.framing == "chunked" and response.body == b"x" * 200000
    # an HTTP/1.0 client cannot read chunked: the body is delimited by the close instead
    async with await Client.open(env.port) as client:
        response = await client.exchange(request("GET", "/stream?bytes=100000", version="1.0"))
        assert response.framing == "close" and response.body == b"x" * 100000
        assert response.header("connection") == "close"


def rss_kib(pid: int, field_name: str) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field_name}:\s+(\d+) kB", status, re.M).group(1))  # type: ignore[union-attr]


async def test_large_bodies_stream_both_ways_with_bounded_memory(env: Env) -> None:
    size = 256 * MiB
    block = bytes(range(256)) * 4096  # 1 MiB
    assert env.sc.proc is not None
    pid = env.sc.proc.pid
    rss_before = rss_kib(pid, "VmRSS")

    async def upload() -> AsyncIterator[bytes]:
        for _ in range(size // len(block)):
            yield block

    timeout = aiohttp.ClientTimeout(total=120)
    async with env.http.post(env.sc.url() + "/upload", data=upload(), headers={"Host": "echo"},
                             timeout=timeout) as resp:
        assert resp.status == 200
        echoed = await resp.json()
    expected = hashlib.sha256()
    for _ in range(size // len(block)):
        expected.update(block)
    assert echoed["body_bytes"] == size and echoed["body_sha256"] == expected.hexdigest()

    received = 0
    async with env.http.get(env.sc.url() + f"/stream?bytes={size}", headers={"Host": "echo"},
                            timeout=timeout) as resp:
        assert resp.status == 200
        async for chunk in resp.content.iter_chunked(MiB):
            received += len(chunk)
    assert received == size
    peak = rss_kib(pid, "VmHWM")  # the kernel's high-water mark: no sampling needed
    assert peak < 80 * 1024, f"sidecar peak RSS {peak} KiB while 2 x 256 MiB passed through"
    assert peak - rss_before < 24 * 1024, f"sidecar RSS grew from {rss_before} to {peak} KiB"


async def test_expect_100_continue_is_answered_by_the_sidecar(env: Env) -> None:
    async with await Client.open(env.port) as client:
        await client.send(request("POST", "/expect", headers=[("Expect", "100-continue"),
                                                              ("Content-Length", "12")]))
        interim = await client.response()
        assert interim.status == 100 and interim.headers == []
        await client.send(b"after 100 ok")
        final = await client.response()
        assert final.status == 200
        assert final.json()["body"] == "after 100 ok"
        assert "expect" not in final.echoed_headers(), "Expect is hop-by-hop"


async def test_head_204_and_304_have_no_body(env: Env) -> None:
    async with await Client.open(env.port) as client:
        head = await client.exchange(request("HEAD", "/head"), head_only=True)
        assert head.status == 200 and int(head.header("content-length") or 0) > 0
        no_content = await client.exchange(request("GET", "/status/204"))
        assert no_content.status == 204
        assert no_content.header("content-length") is None and no_content.header("transfer-encoding") is None
        not_modified = await client.exchange(request("GET", "/status/304"))
        assert not_modified.status == 304 and not_modified.header("transfer-encoding") is None
        # had any of them carried body bytes, this response would not parse
        after = await client.exchange(request("GET", "/after"))
        assert after.status == 200 and after.json()["path"] == "/after"


async def test_upstream_close_delimited_response_is_reframed(env: Env) -> None:
    async with await Client.open(env.port) as client:
        for _ in range(2):  # the downstream connection outlives each upstream one
            response = await client.exchange(request("GET", "/legacy", host="legacy"))
            assert response.status == 200 and response.framing == "chunked"
            assert response.body == LEGACY_BODY and response.header("connection") is None
    assert env.legacy.connections >= 2


async def test_an_upstream_transfer_coding_the_sidecar_cannot_pass_on_is_a_502(env: Env) -> None:
    """Bodies are re-framed, so a gzip transfer coding would reach the client undeclared."""
    async with await Client.open(env.port) as client:
        response = await client.exchange(request("GET", "/coded", host="coded"))
    assert response.status == 502 and response.json()["error"] == "upstream_protocol_error"
    assert b"\x1f\x8b" not in response.body


# === headers ======================================================================================


async def test_hop_by_hop_headers_are_removed_both_ways(env: Env) -> None:
    before = len(env.rec.received)
    async with await Client.open(env.port) as client:
        response = await client.exchange(request("GET", "/hop", host="rec", headers=[
            ("Connection", "keep-alive, X-Hop-Token"), ("X-Hop-Token", "secret"), ("Keep-Alive", "timeout=5"),
            ("Proxy-Connection", "keep-alive"), ("TE", "trailers"), ("Trailer", "X-T"), ("Upgrade", "h2c"),
            ("X-End-To-End", "kept")]))
        assert response.status == 200
    sent = dict(upstream_headers(env.rec.received[before:]))
    assert sent["x-end-to-end"] == "kept"
    for name in ("connection", "x-hop-token", "keep-alive", "proxy-connection", "te", "trailer", "upgrade"):
        assert name not in sent, f"{name} was forwarded upstream"

    async with await Client.open(env.port) as client:
        response = await client.exchange(request("GET", "/hop", host="hoppy"))
    assert response.status == 200 and response.body == b"ok"
    assert response.header("x-end-to-end") == "kept"
    for name in ("x-resp-hop", "keep-alive", "proxy-connection", "trailer", "connection"):
        assert response.header(name) is None, f"{name} was forwarded downstream"


async def test_a_name_s_lines_reach_the_app_in_order_whatever_their_spelling(env: Env) -> None:
    # RFC 9110 §5.3: a name's lines are one list in order. Lines the sidecar passes on
    # untouched come first, then the ones it read on the way (docs/operations.md)
    before = len(env.rec.received)
    async with await Client.open(env.port) as client:
        response = await client.exchange(request("GET", "/order", host="rec", headers=[
            ("Accept", "a"), ("X-Request-ID", "r-1"), ("ACCEPT", "b"), ("Cookie", "c=1"), ("accept", "c"),
            ("X-Custom", "spaced \t"), ("X-Forwarded-Proto", "https")]))
        assert response.status == 200
    raw = env.rec.received[before:]
    sent = upstream_headers(raw)
    assert [(n, v) for n, v in sent if n in ("accept", "cookie", "x-custom", "x-request-id")] == [
        ("accept", "a"), ("accept", "b"), ("cookie", "c=1"), ("accept", "c"), ("x-custom", "spaced"),
        ("x-request-id", "r-1")]
    assert b"\r\naccept: a\r\naccept: b\r\ncookie: c=1\r\naccept: c\r\nx-custom: spaced\r\n" in raw
    assert [v for n, v in sent if n == "x-forwarded-proto"] == ["https"]


async def test_a_connection_s_responses_each_carry_their_own_length(env: Env) -> None:
    # the connection keeps the last content-length line made (``LengthLine``): a response of
    # another length gets its own, one of the same length the same
    async with await Client.open(env.port) as client:
        for path in ("/len/a", "/len/a", "/len/" + "b" * 40, "/len/a", "/len/" + "c" * 300, "/len/a"):
            response = await client.exchange(request("GET", path))
            assert response.status == 200 and response.framing == "length"
            assert response.header("content-length") == str(len(response.body))
            assert response.json()["path"] == path
        # and its requests' bodies upstream, each its own length
        for body in (b"x" * 5, b"x" * 5, b"y" * 700, b"", b"x" * 5):
            response = await client.exchange(request("POST", "/len/post", body=body))
            assert response.status == 200
            assert (response.json()["body_bytes"], response.echoed_headers()["content-length"]) == (
                len(body), str(len(body)))


async def test_request_id_is_kept_when_valid_and_generated_otherwise(env: Env) -> None:
    async with await Client.open(env.port) as client:
        kept = await client.exchange(request("GET", "/rid/kept", headers=[("X-Request-ID", "req-123")]))
        assert kept.header("x-request-id") == "req-123"
        assert kept.echoed_headers()["x-request-id"] == "req-123"
        for path, headers in (("/rid/none", []), ("/rid/invalid", [("X-Request-ID", "has spaces in it")]),
                              ("/rid/long", [("X-Request-ID", "a" * 129)])):
            response = await client.exchange(request("GET", path, headers=headers))
            rid = response.header("x-request-id")
            assert rid is not None and re.fullmatch("[0-9a-f]{32}", rid), rid
            assert response.echoed_headers()["x-request-id"] == rid
            assert (await env.access_for(path))[-1]["request_id"] == rid
        # more requests than one batch of ids (``RequestIds``): every one its own
        made = set()
        for _ in range(150):
            rid = (await client.exchange(request("GET", "/rid/many"))).header("x-request-id")
            assert rid is not None and re.fullmatch("[0-9a-f]{32}", rid), rid
            made.add(rid)
        assert len(made) == 150


async def test_forwarded_headers_are_appended_and_set(env: Env) -> None:
    async with await Client.open(env.port) as client:
        before = len(env.rec.received)
        await client.exchange(request("GET", "/xff", host="rec", headers=[
            ("X-Forwarded-For", "10.0.0.1"), ("X-Forwarded-For", "10.0.0.2")]))
        sent = upstream_headers(env.rec.received[before:])
        assert [v for n, v in sent if n == "x-forwarded-for"] == ["10.0.0.1, 10.0.0.2, 127.0.0.1"]
        assert [v for n, v in sent if n == "x-forwarded-proto"] == ["http"]
        before = len(env.rec.received)
        await client.exchange(request("GET", "/xfp", host="rec", headers=[("X-Forwarded-Proto", "https")]))
        sent = upstream_headers(env.rec.received[before:])
        assert [v for n, v in sent if n == "x-forwarded-proto"] == ["https"]
        assert [v for n, v in sent if n == "x-forwarded-for"] == ["127.0.0.1"]
        # each request of a connection gets its own x-forwarded-for, and each its own Host
        # line, whatever the one before said (the sidecar keeps the last line made of each)
        for value, host in (("10.0.0.3", "rec"), ("10.0.0.3", "echo"), ("10.0.0.1, 10.0.0.2", "rec"),
                            (None, "rec"), ("10.0.0.3", "rec")):
            before = len(env.rec.received)
            response = await client.exchange(request(
                "GET", "/xff/again", host=host, headers=[("X-Forwarded-For", value)] if value else []))
            assert response.status == 200
            relayed = f"{value}, 127.0.0.1" if value else "127.0.0.1"
            if host == "echo":
                assert response.echoed_headers()["x-forwarded-for"] == relayed
                assert response.echoed_headers()["host"] == "echo"
                continue
            sent = upstream_headers(env.rec.received[before:])
            assert [v for n, v in sent if n == "x-forwarded-for"] == [relayed]
            assert [v for n, v in sent if n == "host"] == ["rec"]


async def test_mesh_identity_headers_from_outside_are_stripped(env: Env) -> None:
    spoofed = [("X-Pake-Peer-Identity", "spiffe://pake.local/service/admin"), ("X-Pake-Attempts", "9")]
    for port in (env.port, env.sc.ports["inbound"]):
        async with await Client.open(port) as client:
            headers = (await client.exchange(request("GET", "/whoami", headers=spoofed))).echoed_headers()
        # on a plain listener there is no peer identity; the attempt count is the mesh's own
        assert "x-pake-peer-identity" not in headers and headers.get("x-pake-attempts") != "9"


# === upgrade ======================================================================================


async def test_websocket_is_tunnelled_both_ways(env: Env) -> None:
    big = bytes(range(256)) * 4096  # 1 MiB each way, past every buffer's high-water mark
    for url, headers in ((env.sc.url("inbound") + "/ws", {}), (env.sc.url() + "/ws", {"Host": "echo"})):
        async with env.http.ws_connect(url, headers=headers) as ws:
            await ws.send_str("hello through the tunnel")
            assert await ws.receive_str(timeout=TIMEOUT) == "hello through the tunnel"
            await ws.send_bytes(big)
            assert await ws.receive_bytes(timeout=TIMEOUT) == big
            await ws.close()
        assert ws.close_code == 1000


# === local replies =================================================================================


async def local_reply(env: Env, host: str, path: str) -> tuple[Response, dict[str, Any], float]:
    start = time.monotonic()
    async with await Client.open(env.port) as client:
        response = await client.exchange(request("GET", path, host=host))
    elapsed = time.monotonic() - start
    assert response.header("content-type") == "application/json"
    assert response.json()["service"] == "echo"
    return response, (await env.access_for(path))[-1], elapsed


async def test_unknown_host_is_404_no_route(env: Env) -> None:
    response, access, _ = await local_reply(env, "nope.example", "/nr")
    assert response.status == 404 and response.json()["error"] == "no_route"
    assert access["flags"] == "NR" and access["status"] == 404


async def test_upstream_connect_failure_is_503_uf(env: Env) -> None:
    response, access, elapsed = await local_reply(env, "dead", "/uf")
    assert response.status == 503 and response.json()["error"] == "upstream_connect_failure"
    assert str(env.dead_port) in response.json()["detail"]
    assert access["flags"] == "UF" and access["cluster"] == "dead"
    assert elapsed < 2.0, "a refused connect fails at once"


async def test_route_timeout_is_504_ut(env: Env) -> None:
    response, access, elapsed = await local_reply(env, "silent", "/ut")
    assert response.status == 504 and response.json()["error"] == "upstream_timeout"
    assert access["flags"] == "UT" and access["cluster"] == "silent"
    assert 0.28 <= elapsed < 3.0, f"route timeout is 300ms, answered after {elapsed:.3f}s"
    assert [s.path for s in env.silent.seen] == ["/ut"]


async def test_request_on_a_reused_connection_the_upstream_closed_is_resent_once(env: Env) -> None:
    async with await Client.open(env.port) as client:
        first = await client.exchange(request("GET", "/resend/warm", host="flaky"))
        assert first.status == 200
        connections = env.flaky.connections
        # the pooled connection is reused; the upstream closes it on seeing the request
        second = await client.exchange(request("POST", "/resend/again", host="flaky", body=b"payload"))
        assert second.status == 200 and second.body == b"ok payload"
    tries = [s for s in env.flaky.seen if s.path == "/resend/again"]
    assert [(s.nth, s.body) for s in tries] == [(1, b"payload"), (0, b"payload")]
    assert env.flaky.connections == connections + 1
    assert (await env.access_for("/resend/again"))[-1]["status"] == 200


async def test_a_request_the_upstream_resets_is_not_resent_twice(env: Env) -> None:
    async with await Client.open(env.port) as client:
        response = await client.exchange(request("GET", "/always-close", host="flaky"))
    assert response.status == 502 and response.json()["error"] == "upstream_reset"
    tries = [s for s in env.flaky.seen if s.path == "/always-close"]
    assert 1 <= len(tries) <= 2 and (len(tries) == 1 or tries[0].nth > 0), \
        "only a failure on a reused connection is re-sent, and only once"


# === admin ========================================================================================


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_metrics_count_requests_and_local_replies(env: Env) -> None:
    async with env.http.get(env.sc.admin + "/metrics") as resp:
        assert resp.status == 200 and resp.content_type == "text/plain"
        before = samples(await resp.text())
    async with await Client.open(env.port) as client:
        for i in range(3):
            assert (await client.exchange(request("GET", f"/m/{i}"))).status == 200
        assert (await client.exchange(request("GET", "/m/404", host="unknown"))).status == 404
        assert (await client.exchange(request("GET", "/m/503", host="dead"))).status == 503
        await env.access_for("/m/503")
        async with env.http.get(env.sc.admin + "/metrics") as resp:
            after = samples(await resp.text())  # while this client is still connected

    def delta(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("pake_requests_total", listener="outbound", route="echo/default", cluster="echo",
                 status_class="2xx") == 3
    assert delta("pake_requests_total", listener="outbound", route="-", cluster="-", status_class="4xx") == 1
    assert delta("pake_local_replies_total", listener="outbound", flag="NR") == 1
    assert delta("pake_request_duration_seconds_count", listener="outbound", cluster="echo") == 3
    assert delta("pake_local_replies_total", listener="outbound", flag="UF") == 1
    assert delta("pake_upstream_connect_failures_total", cluster="dead") == 1
    assert after[("pake_downstream_connections_active", frozenset({("listener", "outbound")}))] >= 1


async def test_admin_config_and_clusters(env: Env) -> None:
    async with env.http.get(env.sc.admin + "/config") as resp:
        assert resp.status == 200
        config = await resp.json()
    async with env.http.get(env.sc.admin + "/readyz") as resp:
        ready = await resp.json()
    assert config["version"] == ready["version"]
    assert config["bootstrap"]["service"] == "echo"
    echo_endpoint = f"127.0.0.1:{env.echo.port}"
    assert set(config["mesh"]["services"]) == {"echo", "rec", "hoppy", "coded", "silent", "dead", "legacy",
                                               "flaky"}
    assert json.dumps(config["mesh"]["services"]["echo"]["endpoints"]).count(str(env.echo.port)) == 1

    async with env.http.get(env.sc.admin + "/clusters") as resp:
        assert resp.status == 200
        clusters = {c["name"]: c for c in (await resp.json())["clusters"]}
    assert {"echo", "rec", "dead"} <= set(clusters)
    assert [e["address"] for e in clusters["echo"]["endpoints"]] == [echo_endpoint]
    assert [e["address"] for e in clusters["dead"]["endpoints"]] == [f"127.0.0.1:{env.dead_port}"]

    async with env.http.post(env.sc.admin + "/config") as resp:
        assert resp.status == 405, "admin is read-only"


# === limits and downstream timeouts (sidecars of their own) ========================================


async def test_connections_past_max_connections_are_closed(tmp_path: Path) -> None:
    async with RecordingUpstream() as up, SidecarProcess(
            tmp_path, bootstrap={"service": "echo", "limits": {"max_connections": 2}},
            mesh={"services": {"echo": {"endpoints": [up.address]}}}) as sc:
        port = sc.ports["outbound"]
        first, second = await Client.open(port), await Client.open(port)
        for client in (first, second):
            assert (await client.exchange(request("GET", "/held"))).status == 200
        async with await Client.open(port) as third:
            await third.send(request("GET", "/third"))
            assert await third.closed() == b"", "the third connection is closed without an answer"
        await first.__aexit__()

        async def accepted() -> bool:
            async with await Client.open(port) as client:
                try:
                    return (await client.exchange(request("GET", "/again"), timeout=2.0)).status == 200
                except (asyncio.IncompleteReadError, ConnectionError):
                    return False

        async with asyncio.timeout(TIMEOUT):
            while not await accepted():  # once the sidecar has seen the first one close
                pass
        await second.__aexit__()
        async with aiohttp.ClientSession() as http, http.get(sc.admin + "/metrics") as resp:
            metrics = samples(await resp.text())
    refused = metrics[("pake_downstream_connections_refused_total", frozenset({("listener", "outbound"), ("reason", "max_connections")}))]
    assert refused >= 1
    assert "/third" not in up.received.decode("latin-1")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def tight(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[SidecarProcess, RecordingUpstream]]:
    """A sidecar with 300 ms request-headers and idle timeouts."""
    async with RecordingUpstream() as up, SidecarProcess(
            tmp_path_factory.mktemp("tight"),
            bootstrap={"service": "echo", "timeouts": {"request_headers": "300ms", "idle": "300ms"}},
            mesh={"services": {"echo": {"endpoints": [up.address]}}}) as sc:
        yield sc, up


async def test_request_headers_timeout_is_408(tight: tuple[SidecarProcess, RecordingUpstream]) -> None:
    sc, up = tight
    before = len(up.received)
    async with await Client.open(sc.ports["outbound"]) as client:
        start = time.monotonic()
        await client.send(b"GET /half HTTP/1.1\r\nHost: echo\r\n")
        response = await client.response()
        elapsed = time.monotonic() - start
        assert response.status == 408 and response.json()["error"] == "request_timeout"
        assert response.header("connection") == "close"
        assert await client.closed() == b""
    assert 0.28 <= elapsed < 3.0, elapsed
    assert up.received[before:] == b""


async def test_request_headers_timeout_counts_from_the_first_byte(
        tight: tuple[SidecarProcess, RecordingUpstream]) -> None:
    """A client trickling header lines does not hold the connection past the timeout."""
    sc, _ = tight
    async with await Client.open(sc.ports["outbound"]) as client:
        start = time.monotonic()
        await client.send(b"GET /slowloris HTTP/1.1\r\nHost: echo\r\n")
        answer = asyncio.ensure_future(client.response())
        try:
            for i in range(30):  # a header line every 100 ms for up to 3 s
                done, _ = await asyncio.wait({answer}, timeout=0.1)
                if done:
                    break
                await client.send(b"X-Trickle-%d: 1\r\n" % i)
        except ConnectionResetError:
            pass
        response = await answer
    assert response.status == 408 and time.monotonic() - start < 2.0


async def test_idle_keep_alive_connection_is_closed(tight: tuple[SidecarProcess, RecordingUpstream]) -> None:
    sc, _ = tight
    async with await Client.open(sc.ports["outbound"]) as client:
        assert (await client.exchange(request("GET", "/then-idle"))).status == 200
        start = time.monotonic()
        assert await client.closed() == b"", "an idle connection is closed without a response"
        assert 0.2 <= time.monotonic() - start < 3.0
    async with await Client.open(sc.ports["outbound"]) as client:  # never sends a byte
        start = time.monotonic()
        assert await client.closed() == b""
        assert 0.2 <= time.monotonic() - start < 3.0


async def test_a_pooled_connection_is_closed_once_idle_for_the_pool_s_idle_timeout(tmp_path: Path) -> None:
    """An upstream connection goes back to the pool when its exchange ends, and its idle
    timer counts from there: used again within ``idle_timeout`` it is kept (one connection
    for every request), left idle it is closed once the timeout has passed, not before."""
    opened: list[float] = []
    closed: list[float] = []

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        opened.append(time.monotonic())
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        except (asyncio.IncompleteReadError, ConnectionError):
            closed.append(time.monotonic())
        writer.close()

    server = await asyncio.start_server(app, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with SidecarProcess(tmp_path, bootstrap={"service": "echo"}, mesh={"services": {"echo": {
                "endpoints": [f"127.0.0.1:{port}"], "pool": {"idle_timeout": "500ms"}}}}) as sc:
            async with await Client.open(sc.ports["outbound"]) as client:
                for i in range(4):
                    if i:
                        await asyncio.sleep(0.25)  # idle for half the timeout, then used again
                    assert (await client.exchange(request("GET", f"/{i}"))).status == 200
                last = time.monotonic()
                deadline = last + 5.0
                while not closed and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
            assert len(opened) == 1, "kept while used within the idle timeout"
            assert closed, "closed once idle"
            assert 0.45 <= closed[0] - last < 3.0, closed[0] - last
    finally:
        server.close()
        await server.wait_closed()
