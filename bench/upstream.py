"""A fast fixed-response upstream for benchmarks: uvloop + httptools, one process.

``python -m bench.upstream --port 0 --profile tiny|realistic`` prints ``PORT <n>`` once
bound. tiny: 200 with a 5-byte body. realistic: 200 with a 1 KiB JSON body and 6 headers
(cache-control, x-request-id echoed, x-content-type-options, vary, x-ratelimit-remaining,
server-timing), as ``../shared/bench/README.md`` describes.
"""

from __future__ import annotations

import argparse
import asyncio
import json

import httptools
import uvloop

__all__ = ["main", "response_for"]


def response_for(profile: str) -> tuple[bytes, bytes]:
    """(head up to the request-id header, rest of head + body)."""
    if profile == "tiny":
        return b"", b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-type: text/plain\r\n\r\nhello"
    body = json.dumps({"items": [{"id": i, "name": f"item-{i:04d}", "ok": True} for i in range(24)]})
    body = body[:1024].ljust(1024).encode()
    head = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncache-control: no-store\r\n"
            b"x-content-type-options: nosniff\r\nvary: accept-encoding\r\n"
            b"x-ratelimit-remaining: 99\r\nserver-timing: app;dur=0.2\r\n")
    return head, b"content-length: %d\r\n\r\n%b" % (len(body), body)


class _Echo(asyncio.Protocol):
    def __init__(self, profile: str) -> None:
        self.first, self.rest = response_for(profile)
        self.realistic = profile != "tiny"
        self.parser = httptools.HttpRequestParser(self)
        self.request_id = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.realistic and name.lower() == b"x-request-id":
            self.request_id = value

    def on_message_complete(self) -> None:
        if self.realistic:
            self.transport.write(self.first + b"x-request-id: " + self.request_id + b"\r\n" + self.rest)
        else:
            self.transport.write(self.rest)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--profile", choices=("tiny", "realistic"), default="tiny")
    args = parser.parse_args()

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Echo(args.profile), args.host, args.port, backlog=1024)
        print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
        await server.serve_forever()

    uvloop.run(serve())


if __name__ == "__main__":
    main()
