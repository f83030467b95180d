"""Raw-socket conformance of the sidecar's request framing rules (issue 2, RFC 9110/9112).

Every refused request must get its status and a JSON local reply, the connection must be
closed by the sidecar, and the upstream must see none of it. Each request is sent in one
write, the way a smuggling attempt arrives. After every refused request a valid one goes
through the same sidecar: that keeps an idle pooled upstream connection ready (so a
request that wrongly reaches the router would be written upstream at once, not after a
connect) and orders the upstream's bytes, so "what arrived since" is exactly the valid one.

One sidecar and one recording upstream serve the whole module (``limits.max_request_body``
is 1 KiB there); a second sidecar allows underscores in header names.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.helpers.sidecar_process import SidecarProcess
from tests.helpers.upstreams import RecordingUpstream

pytestmark = pytest.mark.asyncio(loop_scope="module")

TIMEOUT = 5.0
MAX_BODY = 1024


# === a raw HTTP/1.1 client ===================================================================


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    rest: bytes = b""  # anything after the response

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name]
        assert len(values) <= 1, f"{name} appears {len(values)} times: {self.headers}"
        return values[0] if values else None

    def json(self) -> Any:
        assert self.header("content-type") == "application/json"
        return json.loads(self.body)


def parse_response(raw: bytes) -> Response:
    head, sep, rest = raw.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {raw[:200]!r}"
    status_line, *lines = head.decode("latin-1").split("\r\n")
    version, status, _reason = status_line.split(" ", 2)
    assert version == "HTTP/1.1", status_line
    headers = []
    for line in lines:
        name, _, value = line.partition(":")
        headers.append((name.lower(), value.strip()))
    length = [int(v) for k, v in headers if k == "content-length"]
    assert len(length) == 1, f"a local reply is framed by one Content-Length: {headers}"
    return Response(int(status), headers, rest[:length[0]], rest[length[0]:])


def _complete(raw: bytes) -> bool:
    head, sep, rest = raw.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return bool(sep) and len(rest) >= int(value)
    return bool(sep)


async def read_reply(reader: asyncio.StreamReader) -> tuple[bytes, bool]:
    """Read one response, then wait (briefly) for the close. Returns what was read and
    whether the sidecar closed the connection."""
    raw = b""
    try:
        # the sidecar closes in the same step as it writes the reply: a short wait suffices
        # once the response is complete, which keeps a wrongly kept-open connection cheap
        async with asyncio.timeout(TIMEOUT) as deadline:
            while chunk := await reader.read(65536):
                raw += chunk
                if _complete(raw):
                    deadline.reschedule(min(deadline.when() or 0.0, asyncio.get_running_loop().time() + 1.0))
        return raw, True
    except TimeoutError:
        return raw, False
    except ConnectionResetError:
        return raw, True  # closed too, though without a FIN: whatever was read is the answer


async def send_raw(port: int, data: bytes) -> tuple[bytes, bool]:
    """Send ``data`` in one write and read the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        return await read_reply(reader)
    finally:
        writer.close()


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll a condition the test cannot await (bytes arriving at the upstream)."""
    async with asyncio.timeout(TIMEOUT):
        while not condition():
            await asyncio.sleep(0.005)


# === the module's sidecar ====================================================================


@dataclass
class Mesh:
    sidecar: SidecarProcess
    upstream: RecordingUpstream
    sentinels: int = field(default=0)

    @property
    def port(self) -> int:
        return self.sidecar.ports["outbound"]

    async def sentinel(self) -> bytes:
        """A valid request through the sidecar; returns what the upstream saw for it."""
        self.sentinels += 1
        path = b"/sentinel-%d" % self.sentinels
        before = len(self.upstream.received)
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n")
            async with asyncio.timeout(TIMEOUT):
                answer = await reader.read()
        finally:
            writer.close()
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        seen = self.upstream.received[before:]
        assert seen.startswith(b"GET " + path + b" HTTP/1.1\r\n"), seen[:200]
        return seen


async def refused(mesh: Mesh, data: bytes, status: int, error: str) -> Response:
    """``data`` is answered with ``status``/``error``, the connection closed, nothing forwarded."""
    before = len(mesh.upstream.received)
    connections = mesh.upstream.connections
    raw, closed = await send_raw(mesh.port, data)
    forwarded = mesh.upstream.received[before:]
    seen = await mesh.sentinel()
    forwarded += mesh.upstream.received[before + len(forwarded):-len(seen)]
    facts = f"answer={raw[:300]!r} closed={closed} upstream saw={forwarded[:200]!r}"
    assert raw, f"the sidecar sent no answer; {facts}"
    reply = parse_response(raw)
    assert reply.status == status, facts
    assert reply.json()["error"] == error, facts
    assert reply.json()["service"] == "echo" and reply.json()["detail"]
    assert reply.header("connection") == "close", facts
    assert closed, f"the sidecar must close the connection after refusing a request; {facts}"
    assert reply.rest == b"", f"nothing may follow the refusal; {facts}"
    assert forwarded == b"", f"the upstream saw part of a refused request; {facts}"
    assert mesh.upstream.connections - connections <= 1  # at most the sentinel's
    return reply


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    async with RecordingUpstream() as upstream:
        services = {"echo": {"endpoints": [upstream.address]}}
        boot = {"service": "echo", "limits": {"max_request_body": f"{MAX_BODY}B"}}
        async with SidecarProcess(tmp_path_factory.mktemp("framing"), bootstrap=boot,
                                  mesh={"services": services}) as sc:
            mesh = Mesh(sc, upstream)
            await mesh.sentinel()  # a pooled upstream connection from the start
            yield mesh


# === the refused requests ======================================================================

HOST = b"Host: echo"
H = HOST + b"\r\n"
POST_CHUNKED = b"POST /c HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"


def get(*headers: bytes, target: bytes = b"/", version: bytes = b"HTTP/1.1") -> bytes:
    return b"GET " + target + b" " + version + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"


BAD_REQUEST = [
    # --- Content-Length and Transfer-Encoding together, or Content-Length twice -------------
    ("cl-then-te", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"0\r\n\r\n"),
    ("te-then-cl", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
                   b"0\r\n\r\n"),
    ("differing-content-lengths", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\n"
                                  b"hello!"),
    ("content-length-list", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5, 6\r\n\r\nhello!"),
    ("content-length-sign", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +5\r\n\r\nhello"),
    # --- Transfer-Encoding other than one final chunked ------------------------------------
    ("te-gzip", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\nhello"),
    ("te-identity", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: identity\r\n\r\nhello"),
    ("te-chunked-then-gzip", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n"),
    # the sidecar re-frames bodies itself, so it cannot pass a gzip coding on: refused as well
    ("te-gzip-then-chunked", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"),
    ("te-chunked-twice-in-list", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, chunked\r\n\r\n"
                                 b"0\r\n\r\n"),
    ("te-chunked-two-lines", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("te-xchunked", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"),
    # --- chunk sizes, chunk lines, chunk extensions, trailers --------------------------------
    ("chunk-size-not-hex", POST_CHUNKED + b"zz\r\nhello\r\n0\r\n\r\n"),
    ("chunk-size-negative", POST_CHUNKED + b"-5\r\nhello\r\n0\r\n\r\n"),
    ("chunk-size-0x-prefix", POST_CHUNKED + b"0x5\r\nhello\r\n0\r\n\r\n"),
    ("chunk-size-overflow", POST_CHUNKED + b"10000000000000005\r\nhello\r\n0\r\n\r\n"),
    ("chunk-size-space", POST_CHUNKED + b"5 \r\nhello\r\n0\r\n\r\n"),
    ("chunk-size-empty", POST_CHUNKED + b"\r\nhello\r\n0\r\n\r\n"),
    ("chunk-data-longer-than-size", POST_CHUNKED + b"5\r\nhelloXX\r\n0\r\n\r\n"),
    ("chunk-lines-bare-lf", POST_CHUNKED + b"5\nhello\n0\n\n"),
    ("chunk-line-bare-cr", POST_CHUNKED + b"5\rhello\r\n0\r\n\r\n"),
    ("chunk-extension-over-4KiB", POST_CHUNKED + b"5;ext=" + b"x" * 8000 + b"\r\nhello\r\n0\r\n\r\n"),
    ("trailer-invalid-name", POST_CHUNKED + b"5\r\nhello\r\n0\r\nX T: 1\r\n\r\n"),
    # --- header lines ------------------------------------------------------------------------
    ("obs-fold-space", get(HOST, b"X-A: a", b" folded")),
    ("obs-fold-tab", get(HOST, b"X-A: a", b"\tfolded")),
    ("space-before-colon", get(HOST, b"X-A : a")),
    ("space-before-colon-in-host", get(b"Host : echo")),
    ("tab-before-colon", get(HOST, b"X-A\t: a")),
    ("name-with-space", get(HOST, b"X A: a")),
    ("name-with-parenthesis", get(HOST, b"X(A): a")),
    ("name-with-slash", get(HOST, b"X/A: a")),
    ("name-with-at", get(HOST, b"@X: a")),
    ("name-empty", get(HOST, b": a")),
    ("name-not-ascii", get(HOST, "X-\u00e9: a".encode())),
    ("value-with-cr", get(HOST, b"X-A: a\rb")),
    ("value-with-lf", get(HOST, b"X-A: a\nb")),
    ("value-with-nul", get(HOST, b"X-A: a\x00b")),
    ("value-with-control-char", get(HOST, b"X-A: a\x01b")),
    ("value-with-del", get(HOST, b"X-A: a\x7fb")),
    ("line-space-before-first-header", b"GET / HTTP/1.1\r\n Host: echo\r\n\r\n"),
    # --- line ends ---------------------------------------------------------------------------
    ("bare-lf-everywhere", b"GET / HTTP/1.1\nHost: echo\n\n"),
    ("bare-lf-after-header", b"GET / HTTP/1.1\r\nHost: echo\nX-A: b\r\n\r\n"),
    ("bare-lf-ends-head", b"GET / HTTP/1.1\r\nHost: echo\r\n\n"),
    ("bare-cr-everywhere", b"GET / HTTP/1.1\rHost: echo\r\r"),
    ("bare-cr-after-header", b"GET / HTTP/1.1\r\nHost: echo\rX-A: b\r\n\r\n"),
    # --- Host ----------------------------------------------------------------------------------
    ("http11-without-host", get()),
    ("two-hosts-same", get(HOST, H)),
    ("two-hosts-differing", get(HOST, b"Host: other")),
    ("host-list", get(b"Host: echo, other")),
    ("host-empty", get(b"Host:")),
    ("host-with-space", get(b"Host: ec ho")),
    ("host-with-userinfo", get(b"Host: user@echo")),
    # RFC 9112 §3.2: "more than one Host header field line or a Host header field with an
    # invalid field value" is a 400 for any request; the absolute-form rule only says whose
    # authority wins when Host is valid
    ("absolute-form-two-hosts", get(HOST, b"Host: other", target=b"http://echo/abs")),
    ("absolute-form-host-list", get(b"Host: echo, other", target=b"http://echo/abs")),
    ("absolute-form-userinfo", get(HOST, target=b"http://user@echo/abs")),
    # --- names aliasing other names -----------------------------------------------------------
    ("underscore-in-name", get(HOST, b"X_User: mallory")),
    ("underscore-in-name-mixed-case", get(HOST, b"X-Forwarded_For: 10.0.0.1")),
    # --- the request line ----------------------------------------------------------------------
    ("target-not-a-path", get(HOST, target=b"abc")),
    ("asterisk-target-with-get", get(HOST, target=b"*")),
    ("space-in-target", get(HOST, target=b"/a b")),
    ("method-invalid", b"G(T / HTTP/1.1\r\n" + H + b"\r\n"),
    ("http-1.2", get(HOST, version=b"HTTP/1.2")),
]


@pytest.mark.parametrize("data", [pytest.param(d, id=i) for i, d in BAD_REQUEST])
async def test_malformed_or_ambiguous_request_is_refused_with_400(mesh: Mesh, data: bytes) -> None:
    await refused(mesh, data, 400, "bad_request")


def many_headers(count: int, size: int = 1) -> list[bytes]:
    return [b"X-H%d: %s" % (i, b"v" * size) for i in range(count)]


LIMITS = [
    ("request-line-over-8KiB", get(HOST, target=b"/" + b"a" * (8 * 1024 + 1)), 414, "uri_too_long"),
    ("absolute-target-over-8KiB", get(HOST, target=b"http://echo/" + b"a" * (8 * 1024)), 414, "uri_too_long"),
    ("headers-over-60KiB", get(HOST, *many_headers(62, 1000)), 431, "headers_too_large"),
    ("one-header-over-60KiB", get(HOST, b"X-Big: " + b"v" * (61 * 1024)), 431, "headers_too_large"),
    ("header-line-over-68KiB", get(HOST, b"X-Big: " + b"v" * (70 * 1024)), 431, "headers_too_large"),
    ("over-100-headers", get(HOST, *many_headers(100)), 431, "headers_too_large"),
    ("content-length-over-max-body", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: %d\r\n\r\n" % (MAX_BODY + 1)
     + b"x" * (MAX_BODY + 1), 413, "payload_too_large"),
    ("chunked-body-over-max-body", POST_CHUNKED + b"%x\r\n%s\r\n0\r\n\r\n" % (MAX_BODY + 1, b"x" * (MAX_BODY + 1)),
     413, "payload_too_large"),
    ("chunked-body-over-max-body-in-pieces", POST_CHUNKED + b"200\r\n" + b"x" * 512 + b"\r\n"
     + b"200\r\n" + b"x" * 512 + b"\r\n1\r\nx\r\n0\r\n\r\n", 413, "payload_too_large"),
    ("http-2.0", get(HOST, version=b"HTTP/2.0"), 505, "http_version_not_supported"),
    ("connect", b"CONNECT echo:80 HTTP/1.1\r\nHost: echo:80\r\n\r\n", 405, "method_not_allowed"),
    ("expect-other-than-100-continue", get(HOST, b"Expect: 200-ok"), 417, "expectation_failed"),
]


@pytest.mark.parametrize(("data", "status", "error"), [pytest.param(*c[1:], id=c[0]) for c in LIMITS])
async def test_request_over_a_bound_is_refused_with_its_status(mesh: Mesh, data: bytes, status: int,
                                                                error: str) -> None:
    await refused(mesh, data, status, error)


BROKEN_LATER = [
    ("bad-chunk-size", b"zz\r\nhello\r\n0\r\n\r\n", 400, "bad_request"),
    ("chunk-extension-over-4KiB", b"5;ext=" + b"x" * 8000 + b"\r\nhello\r\n0\r\n\r\n", 400, "bad_request"),
    ("body-over-max-body", b"%x\r\n%s\r\n0\r\n\r\n" % (MAX_BODY, b"x" * MAX_BODY), 413, "payload_too_large"),
]


@pytest.mark.parametrize(("rest", "status", "error"), [pytest.param(*c[1:], id=c[0]) for c in BROKEN_LATER])
async def test_a_body_that_breaks_after_its_head_went_upstream_is_refused(mesh: Mesh, rest: bytes, status: int,
                                                                         error: str) -> None:
    """A streamed request's head goes upstream before its body has arrived. When the body
    then breaks the rules and no response has started, the client still gets the refusal,
    and the upstream never receives a complete request."""
    requests, before = mesh.upstream.requests, len(mesh.upstream.received)
    reader, writer = await asyncio.open_connection("127.0.0.1", mesh.port)
    try:
        writer.write(POST_CHUNKED + b"5\r\nhello\r\n")
        await wait_until(lambda: mesh.upstream.received.endswith(b"5\r\nhello\r\n"))
        writer.write(rest)
        raw, closed = await read_reply(reader)
    finally:
        writer.close()
    await mesh.sentinel()
    facts = f"answer={raw[:300]!r} closed={closed} upstream saw={mesh.upstream.received[before:][:300]!r}"
    assert raw, f"the sidecar sent no answer; {facts}"
    reply = parse_response(raw)
    assert reply.status == status, facts
    assert reply.json()["error"] == error, facts
    assert closed and reply.header("connection") == "close", facts
    assert mesh.upstream.requests == requests + 1, f"only the sentinel may complete upstream; {facts}"


# === what is accepted, and how it is forwarded =================================================


async def forwarded(mesh: Mesh, data: bytes) -> tuple[Response, bytes]:
    """Send a request that must be accepted; returns the answer and what the upstream got."""
    before = len(mesh.upstream.received)
    reader, writer = await asyncio.open_connection("127.0.0.1", mesh.port)
    try:
        writer.write(data)
        async with asyncio.timeout(TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
            body = await reader.readexactly(2)
    finally:
        writer.close()
    reply = parse_response(head + body)
    assert reply.status == 200, head
    return reply, mesh.upstream.received[before:]


def upstream_head(seen: bytes) -> tuple[str, list[tuple[str, str]]]:
    """The request line and header lines as the upstream got them (the sidecar writes each
    as ``name: value``: no other whitespace is expected)."""
    head = seen.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    return head[0], [(n, v) for n, _, v in (line.partition(": ") for line in head[1:])]


async def test_bounds_are_not_stricter_than_configured(mesh: Mesh) -> None:
    # a target of almost 8 KiB, exactly 100 header lines, and a body of exactly max_request_body
    target = b"/" + b"a" * (8 * 1024 - 100)
    _, seen = await forwarded(mesh, get(HOST, *many_headers(99), target=target))
    line, headers = upstream_head(seen)
    assert line == f"GET {target.decode()} HTTP/1.1" and ("x-h98", "v") in headers
    body = b"y" * MAX_BODY
    _, seen = await forwarded(mesh, b"POST / HTTP/1.1\r\n" + H + b"Content-Length: %d\r\n\r\n" % MAX_BODY + body)
    assert seen.endswith(b"\r\n\r\n" + body)
    _, seen = await forwarded(mesh, POST_CHUNKED + b"5;name=value\r\nhello\r\n0\r\n\r\n")
    assert seen.endswith(b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n"), "a short chunk extension is accepted and dropped"


async def test_absolute_form_target_wins_over_host_and_host_is_rewritten(mesh: Mesh) -> None:
    _, seen = await forwarded(mesh, get(b"Host: other.example", target=b"http://ECHO:80/abs?q=1"))
    line, headers = upstream_head(seen)
    assert line == "GET /abs?q=1 HTTP/1.1"
    assert [v for n, v in headers if n == "host"] == ["echo:80"]
    _, seen = await forwarded(mesh, get(HOST, target=b"http://echo?q=2"))
    assert upstream_head(seen)[0] == "GET /?q=2 HTTP/1.1"


async def test_forwarded_request_is_reserialised_not_copied(mesh: Mesh) -> None:
    data = (b"POST /r HTTP/1.1\r\nHOST:  Echo \r\nX-Spaced:   padded value\t \r\nX-Case: Keep Me\r\n"
            b"Transfer-Encoding: chunked\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n\r\n"
            b"3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: dropped\r\n\r\n")
    _, seen = await forwarded(mesh, data)
    line, headers = upstream_head(seen)
    assert line == "POST /r HTTP/1.1"
    assert headers[0] == ("host", "echo")  # from the parsed authority, lower-cased, first
    assert ("x-spaced", "padded value") in headers and ("x-case", "Keep Me") in headers
    names = [n for n, _ in headers]
    assert "keep-alive" not in names and "te" not in names and "x-trailer" not in names
    assert names.count("transfer-encoding") == 1
    assert seen.partition(b"\r\n\r\n")[2] == b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"  # re-chunked


async def test_a_refusal_is_logged_with_its_reason(mesh: Mesh) -> None:
    # The line of this refusal, by a header name no other test sends: an earlier test's line
    # can still be on its way (the log writer gathers lines for up to 50 ms), so counting
    # lines does not say which one arrived.
    await refused(mesh, get(HOST, b"X_Logged_Refusal: mallory"), 400, "bad_request")
    [event] = await mesh.sidecar.wait_for_event(
        "refused", where=lambda e: "x_logged_refusal" in str(e.get("reason", "")))
    assert event["status"] == 400 and event["flags"] == "DPE"


async def test_underscores_in_names_are_forwarded_when_allowed(tmp_path: Path) -> None:
    async with RecordingUpstream() as upstream:
        boot = {"service": "echo", "limits": {"allow_underscores_in_headers": True}}
        async with SidecarProcess(tmp_path, bootstrap=boot,
                                  mesh={"services": {"echo": {"endpoints": [upstream.address]}}}) as sc:
            reply, seen = await forwarded(Mesh(sc, upstream), get(HOST, b"X_User: alice"))
    assert ("x_user", "alice") in upstream_head(seen)[1]
    assert reply.header("connection") is None
