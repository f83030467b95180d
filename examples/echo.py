"""``python -m examples.echo``: a small aiohttp app that echoes what it receives.

GET/POST/... any path -> JSON with method, path, query, headers and the body (as text, up to
64 KiB; a larger body is streamed through and only its size and sha256 reported, so the
app itself stays flat in memory). ``/stream?bytes=N`` streams N bytes back. ``/ws`` is a
WebSocket echo. ``/status/NNN`` answers with that status.
"""

from __future__ import annotations

import argparse
import hashlib

from aiohttp import WSMsgType, web

__all__ = ["make_app", "main"]

_INLINE = 64 * 1024


async def echo(request: web.Request) -> web.StreamResponse:
    digest = hashlib.sha256()
    size = 0
    head = bytearray()
    async for chunk in request.content.iter_any():
        size += len(chunk)
        digest.update(chunk)
        if len(head) < _INLINE:
            head += chunk[: _INLINE - len(head)]
    body: dict[str, object] = {
        "method": request.method, "path": request.path, "query": request.query_string,
        "headers": {k: v for k, v in request.headers.items()}, "body_bytes": size,
        "body_sha256": digest.hexdigest(),
    }
    if size <= _INLINE:
        body["body"] = bytes(head).decode("utf-8", "replace")
    return web.json_response(body)


async def stream(request: web.Request) -> web.StreamResponse:
    total = int(request.query.get("bytes", "1048576"))
    response = web.StreamResponse()
    response.enable_chunked_encoding()
    await response.prepare(request)
    block = b"x" * 65536
    sent = 0
    while sent < total:
        piece = block[: min(len(block), total - sent)]
        await response.write(piece)
        sent += len(piece)
    await response.write_eof()
    return response


async def status(request: web.Request) -> web.Response:
    return web.json_response({"status": int(request.match_info["code"])},
                             status=int(request.match_info["code"]))


async def websocket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


def make_app() -> web.Application:
    app = web.Application(client_max_size=0)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/stream", stream)
    app.router.add_route("*", "/status/{code:\\d{3}}", status)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m examples.echo")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    web.run_app(make_app(), host=args.host, port=args.port, print=lambda *_: print(
        f"echo app listening on http://{args.host}:{args.port}", flush=True))


if __name__ == "__main__":
    main()
