"""An upstream that fails on demand, for the end-to-end resilience tests (127.0.0.1, port 0).

``FlakyUpstream`` is a raw asyncio HTTP/1.1 server. Its answer to each request is chosen when
the request arrives, by ``respond(request)``, so a test can switch one endpoint between
healthy, failing (any status and headers), hanging, resetting, or answering in part then
resetting,
while the sidecar keeps its pooled connections. Every request is recorded with the time it
arrived; health-check probes (User-Agent ``pake-health-check``) are kept apart in ``probes``
and answered with ``health_status``, so "no traffic" means no *data-plane* traffic.

``FlakyUpstream(refuse=True)`` holds its port bound but not listening: connecting is refused
at once (no bind-release-rebind race over a "free" port), and ``await listen()`` later serves
on that same port, which is how a test brings a dead endpoint back.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

import httptools

__all__ = ["HANG", "RESET", "FlakyUpstream", "Hang", "Reply", "Request", "Reset", "Truncate", "ok"]

PROBE_AGENT = "pake-health-check"


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names; the last value wins
    body: bytes
    at: float  # time.monotonic() when the request was complete
    lines: tuple[tuple[str, str], ...] = ()  # every header as it came, in order (a repeat too)

    @property
    def attempt(self) -> int | None:
        value = self.headers.get("x-pake-attempts")
        return int(value) if value is not None else None


@dataclass(frozen=True, slots=True)
class Reply:
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b"ok"


@dataclass(frozen=True, slots=True)
class Hang:
    """Never answer (the connection stays open until the peer or the test closes it)."""


@dataclass(frozen=True, slots=True)
class Truncate:
    """Send the status line, headers announcing ``declared`` body bytes and ``sent`` of them,
    then reset the connection: the response has started and cannot complete."""

    status: int = 200
    declared: int = 1000
    sent: int = 100


@dataclass(frozen=True, slots=True)
class Reset:
    """Reset the connection (RST) without sending a byte of the response."""


HANG = Hang()
RESET = Reset()
Answer = Reply | Hang | Truncate | Reset


def ok(request: Request) -> Answer:
    return Reply()


_REASONS = {200: "OK", 404: "Not Found", 500: "Internal Server Error", 502: "Bad Gateway",
            503: "Service Unavailable", 504: "Gateway Timeout"}


class _Conn(asyncio.Protocol):
    def __init__(self, owner: FlakyUpstream) -> None:
        self.owner = owner
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self._url = b""
        self._headers: dict[str, str] = {}
        self._lines: list[tuple[str, str]] = []
        self._body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.owner.connections += 1
        self.owner._transports.add(self.transport)  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._transports.discard(self.transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url, self._headers, self._body, self._lines = b"", {}, [], []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")
        self._lines.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        transport = self.transport
        assert transport is not None
        request = Request(method=self.parser.get_method().decode(), path=self._url.decode("latin-1"),
                          headers=self._headers, body=b"".join(self._body), at=time.monotonic(),
                          lines=tuple(self._lines))
        owner = self.owner
        if request.headers.get("user-agent") == PROBE_AGENT:
            owner.probes.append(request)
            status = owner.health_status
            transport.write(_response(Reply(status, body=b"health")))
            return
        owner.requests.append(request)
        owner._arrived.set()
        answer = owner.respond(request)
        if isinstance(answer, Hang):
            return
        if isinstance(answer, Reset):
            _reset(transport)
            return
        if isinstance(answer, Truncate):
            head = Reply(answer.status, (("content-length", str(answer.declared)),), b"")
            transport.write(_response(head, length=False) + b"x" * answer.sent)
            # Let the bytes leave before the reset, so the response has really started; then a
            # real RST (SO_LINGER 0), not a polite FIN.
            asyncio.get_running_loop().call_later(0.05, _reset, transport)
            return
        transport.write(_response(answer))


def _reset(transport: asyncio.Transport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _response(reply: Reply, *, length: bool = True) -> bytes:
    lines = [f"HTTP/1.1 {reply.status} {_REASONS.get(reply.status, 'Status')}"]
    lines += [f"{name}: {value}" for name, value in reply.headers]
    if length:
        lines.append(f"content-length: {len(reply.body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + reply.body


class FlakyUpstream:
    def __init__(self, respond: Callable[[Request], Answer] = ok, *, refuse: bool = False) -> None:
        self.respond = respond
        self.health_status = 200
        self.requests: list[Request] = []  # data-plane requests, in arrival order
        self.probes: list[Request] = []  # health-check probes
        self.connections = 0
        self.refuse = refuse
        self.server: asyncio.Server | None = None
        self.port = 0
        self._sock: socket.socket | None = None
        self._transports: set[asyncio.Transport] = set()
        self._arrived = asyncio.Event()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def since(self, t: float) -> list[Request]:
        """The data-plane requests that arrived after monotonic time ``t``."""
        return [r for r in self.requests if r.at > t]

    async def wait_for_requests(self, count: int, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.requests) < count:
                self._arrived.clear()
                await self._arrived.wait()

    async def listen(self) -> None:
        """Start serving (on the port held since ``__aenter__`` when refusing)."""
        assert self._sock is not None and self.server is None
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Conn(self), sock=self._sock)

    async def __aenter__(self) -> FlakyUpstream:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self._sock = sock
        self.port = sock.getsockname()[1]
        if not self.refuse:
            await self.listen()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for transport in list(self._transports):
            transport.abort()  # hanging exchanges too
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        elif self._sock is not None:
            self._sock.close()
