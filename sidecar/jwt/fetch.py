"""A tiny HTTPS GET client for key sets: one request per connection, nothing more.

The sidecar does not import aiohttp (one sidecar per service; its RSS counts), and a JWKS
fetch needs only this. Rules: https, or http to a loopback address only; the whole
exchange runs inside one timeout; the head and the body are bounded; a redirect is an
error, never followed (a redirect could point the key fetch anywhere); only 200 is a
success. Errors never carry the body. Runs off the hot path, in the JWKS cache's task.
"""

from __future__ import annotations

import asyncio
import ssl
from contextlib import suppress
from urllib.parse import urlsplit

import httptools

from ..config.reader import is_loopback_host

__all__ = ["FetchError", "https_get"]

MAX_HEAD = 32 * 1024  # status line + headers of the response


class FetchError(Exception):
    """A fetch that gave no usable body; the message is safe to log."""


class _Response:
    """httptools callbacks: collect status, framing and a bounded body."""

    __slots__ = ("body", "complete", "content_length", "head_done", "max_bytes", "too_large")

    def __init__(self, max_bytes: int) -> None:
        self.body = bytearray()
        self.complete = False
        self.head_done = False
        self.content_length: int | None = None
        self.max_bytes = max_bytes
        self.too_large = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"content-length" and value.strip().isdigit():
            self.content_length = int(value)

    def on_headers_complete(self) -> None:
        self.head_done = True
        if self.content_length is not None and self.content_length > self.max_bytes:
            self.too_large = True

    def on_body(self, data: bytes) -> None:
        if len(self.body) + len(data) > self.max_bytes:
            self.too_large = True
            return
        self.body += data

    def on_message_complete(self) -> None:
        self.complete = True


async def https_get(url: str, *, timeout: float, max_bytes: int,
                    ssl_context: ssl.SSLContext | None = None) -> bytes:
    """GET ``url`` and return the body of a 200 response, or raise ``FetchError``.

    ``ssl_context`` defaults to the system's verifying context (certificate and host name
    checked); tests pass one that trusts their own CA."""
    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        raise FetchError("URL has no host")
    if parts.scheme == "https":
        context: ssl.SSLContext | None = ssl_context or ssl.create_default_context()
        port = parts.port or 443
    elif parts.scheme == "http" and is_loopback_host(host):
        context = None
        port = parts.port or 80
    else:
        raise FetchError("only https (or http to a loopback address) is fetched")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    authority = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        authority = f"{authority}:{parts.port}"
    request = (f"GET {target} HTTP/1.1\r\nHost: {authority}\r\n"
               "Accept: application/json, application/jwk-set+json\r\n"
               "Accept-Encoding: identity\r\nUser-Agent: pake-sidecar\r\n"
               "Connection: close\r\n\r\n").encode("ascii")
    try:
        async with asyncio.timeout(timeout):
            return await _exchange(host, port, context, request, max_bytes)
    except TimeoutError:
        raise FetchError(f"timed out after {timeout:g}s") from None
    except OSError as exc:  # connect refused, reset, TLS failures (ssl.SSLError is an OSError)
        raise FetchError(f"{type(exc).__name__}: {exc.strerror or exc}") from None


async def _exchange(host: str, port: int, context: ssl.SSLContext | None, request: bytes,
                    max_bytes: int) -> bytes:
    reader, writer = await asyncio.open_connection(
        host, port, ssl=context, server_hostname=host if context else None)
    try:
        writer.write(request)
        await writer.drain()
        response = _Response(max_bytes)
        parser = httptools.HttpResponseParser(response)
        head_bytes = 0
        while not response.complete:
            data = await reader.read(65536)
            if not data:
                break
            if not response.head_done:
                head_bytes += len(data)
                if head_bytes > MAX_HEAD + max_bytes:
                    raise FetchError("response head too large")
            try:
                parser.feed_data(data)
            except httptools.HttpParserError as exc:
                raise FetchError(f"malformed response: {type(exc).__name__}") from None
            if not response.head_done and head_bytes > MAX_HEAD:
                raise FetchError("response head too large")
            if response.too_large:
                raise FetchError(f"response larger than {max_bytes} bytes")
        if not response.head_done:
            raise FetchError("connection closed before a response")
        status = parser.get_status_code()
        if 300 <= status < 400:
            raise FetchError(f"status {status}: redirects are not followed")
        if status != 200:
            raise FetchError(f"status {status}")
        if not response.complete and response.content_length is not None:
            raise FetchError("response body truncated")
        return bytes(response.body)
    finally:
        writer.close()
        with suppress(OSError, asyncio.TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 1.0)
