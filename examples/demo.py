"""``python -m examples.demo`` (``make demo``): the PAKE demo mesh on loopback, joined to one
control plane.

Starts ``pakectl serve`` first (sidecars on 127.0.0.1:15010, admin API and dashboard on
127.0.0.1:15014, its own OTLP collector on 127.0.0.1:4318; its state, the CA, the tokens and
the applied versions, in ``.pake/demo/`` of the checkout, kept between runs), applies
``examples/pake/mesh.yaml``, then starts the sidecars, each joined with a join token instead
of certificate and mesh files, and the apps behind them (``examples/pake/``: auth, data, ai
and its canary, knowledge, cache, audit, and echo, the diagnostic service): the ``gateway``
(127.0.0.1:18000: outside clients with a JWT or an API key), echo's sidecar (mTLS inbound
127.0.0.1:15006) and the ``frontend`` sidecar (plain outbound 127.0.0.1:15001: Host ``echo``
goes over mTLS to echo's sidecar). Every sidecar traces to the control plane's collector at
100%. It sends requests through the mesh to show that it works, prints the gateway URL, the
dashboard URL and curl lines (``pakectl status`` and ``pakectl check`` work with no flags in
another terminal), and on Ctrl-C or SIGTERM stops every process in reverse order. The
processes' output is in ``.pake/demo/logs/``. ``make demo-tour`` walks through the same mesh.

``--ports-offset N`` moves every port by N when the default ones are taken; ``--any-ports``
lets every process pick a free port (tests use this); ``--state-dir`` keeps the control
plane's and the sidecars' state elsewhere. The static quickstarts (``examples/static/``,
``examples/mtls/``) run without a control plane.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from examples.mint_token import mint
from examples.pake.launch import DEFAULT_STATE_DIR, Mesh
from examples.runner import DemoError, Stopped

__all__ = ["main"]

CONVERGE_TIMEOUT = 10.0  # a new endpoint reaches every caller within this (usually < 1 s)


async def _exchange(port: int, request: bytes) -> tuple[str, dict[str, str] | None]:
    """One request, as curl would send it: the status, and the headers the echo app saw (None
    when the answer is not the echo app's)."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port)
    try:
        writer.write(request)
        async with asyncio.timeout(10):
            raw = await reader.read()
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1].decode() if head else "no response"
    try:
        return status, {k.lower(): v for k, v in json.loads(body)["headers"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return status, None


async def _check(outbound: int) -> tuple[str, str]:
    """One request through frontend -> echo (absolute-form target, as curl -x sends it)."""
    status, seen = await _exchange(
        outbound, b"GET http://echo/hello HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n")
    peer = "?" if seen is None else seen.get("x-pake-peer-identity", "none")
    return status, f"GET http://echo/hello -> {status}; the echo app saw x-pake-peer-identity: {peer}"


async def _check_gateway(port: int) -> list[str]:
    """Through the gateway with demo tokens: an admin may use /echo/admin/, a reader not."""
    lines = []
    for path, sub, role in (("/echo/hello", "alice", "admin"), ("/echo/admin/stats", "bob", "reader")):
        token = mint(sub, [role], ttl=300)
        status, seen = await _exchange(port, (
            f"GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\nAuthorization: Bearer {token}\r\n"
            "Connection: close\r\n\r\n").encode())
        line = f"gateway: GET {path} as {sub} (role {role}) -> {status}"
        if seen is not None:
            line += (f"; the echo app saw x-user: {seen.get('x-user', 'none')}, "
                     f"x-pake-peer-identity: {seen.get('x-pake-peer-identity', 'none')}")
        lines.append(line)
    return lines


async def _first_ok(make_line: Callable[[], Awaitable[tuple[str, str]]]) -> str:
    """The first answer that is a 200 (or the last one after CONVERGE_TIMEOUT): a caller
    learns a new endpoint from the control plane a moment after that endpoint registers."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CONVERGE_TIMEOUT
    while True:
        status, line = await make_line()
        if status == "200" or loop.time() >= deadline:
            return line
        await asyncio.sleep(0.2)


async def _ask(port: int) -> tuple[str, str]:
    """One question through the gateway: gateway -> knowledge -> data and ai."""
    token = mint("alice", ["admin"], ttl=300)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write((f"GET /api/ask?q=mesh HTTP/1.1\r\nHost: localhost:{port}\r\n"
                      f"Authorization: Bearer {token}\r\nConnection: close\r\n\r\n").encode())
        async with asyncio.timeout(10):
            raw = await reader.read()
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1].decode() if head else "no response"
    return status, f"gateway: GET /api/ask?q=mesh as alice -> {status}: {body[:120].decode(errors='replace')}"


def _help(mesh: Mesh) -> str:
    outbound, gateway = mesh.port("frontend", "outbound"), mesh.port("gateway", "gateway")
    admin = mesh.address("control", "admin")
    base = f"http://127.0.0.1:{gateway}"
    flags = "" if admin == "127.0.0.1:15014" else f" --admin {admin}"
    return f"""
[demo] the PAKE mesh is up: 10 sidecars joined the control plane at {mesh.address('control', 'listen')}
  gateway:    {base}
  dashboard:  http://{admin}/dashboard        (traffic, breakers, SLOs, traces)
  .venv/bin/pakectl status{flags}    .venv/bin/pakectl check{flags}    .venv/bin/pakectl top{flags}
  logs:       {mesh.logs}/<process>.log
[demo] try it (JWTs from the DEMO key: examples/gateway/README.md):
  TOKEN=$(.venv/bin/python -m examples.mint_token --sub alice --role admin)
  curl -H "Authorization: Bearer $TOKEN" '{base}/api/ask?q=breaker'      # 200: knowledge asks data and ai
  curl -H "Authorization: Bearer $TOKEN" {base}/api/items                 # 200: data's items, via knowledge
  curl -H "Authorization: Bearer $TOKEN" -H 'content-type: application/json' -d '{{"text": "hello"}}' {base}/api/items   # 201
  curl -H "Authorization: Bearer $TOKEN" {base}/api/items/1               # 200: read through cache (x-cache)
  curl -H "Authorization: Bearer $TOKEN" {base}/auth/whoami               # who the mesh says you are
  curl -H "Authorization: Bearer $TOKEN" {base}/audit/stats               # the mesh's audit records (role admin)
  curl -H "x-api-key: pake-demo-partner-key-never-use-elsewhere" {base}/api/items    # 200: the partner may read
  curl {base}/api/items                                                    # 401: no credentials
  curl -H 'Host: ai' 'http://127.0.0.1:{mesh.port('cache', 'outbound')}/answer?q=x'  # 403: only knowledge may call ai
  curl -X POST http://127.0.0.1:{mesh.port('apps', 'ai')}/admin/fail            # ai fails: watch the breaker (body {{"fail": false}} heals)
[demo] echo, the diagnostic service:
  curl -x http://127.0.0.1:{outbound} http://echo/hello
  curl -H 'Host: echo' http://127.0.0.1:{outbound}/hello
  curl http://127.0.0.1:{mesh.port('frontend', 'admin')}/config     # frontend's certificate: subject, SAN, serial, expiry
  curl -k https://127.0.0.1:{mesh.port('echo', 'inbound')}/      # no client certificate: refused in the handshake
  READER=$(.venv/bin/python -m examples.mint_token --sub bob --role reader)
  curl -H "Authorization: Bearer $TOKEN" {base}/echo/admin/stats          # 200: role admin
  curl -H "Authorization: Bearer $READER" {base}/echo/admin/stats         # 403: only role admin
  curl -H "x-api-key: pake-demo-api-key-never-use-elsewhere" {base}/echo/hello   # 200"""


async def run(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    shift = None if args.any_ports else args.ports_offset
    code = 0
    try:
        async with Mesh(Path(args.state_dir).resolve(), shift, stop) as mesh:
            outbound, gateway = mesh.port("frontend", "outbound"), mesh.port("gateway", "gateway")
            print(f"[demo] {await _first_ok(lambda: _check(outbound))}", flush=True)
            print(f"[demo] {await _first_ok(lambda: _ask(gateway))}", flush=True)
            for line in await _check_gateway(gateway):
                print(f"[demo] {line}", flush=True)
            print(_help(mesh), flush=True)
            print("[demo] Ctrl-C stops everything.", flush=True)
            print(f"[demo] demo ready outbound={outbound} gateway={gateway} "
                  f"admin={mesh.port('control', 'admin')}", flush=True)
            await stop.wait()
            print("[demo] stopping", flush=True)
    except Stopped:
        print("[demo] stopping", flush=True)
    except DemoError as exc:
        print(f"[demo] {exc}", file=sys.stderr, flush=True)
        code = 1
    print("[demo] stopped", flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.demo", description=__doc__.split("\n")[0])
    ports = parser.add_mutually_exclusive_group()
    ports.add_argument("--ports-offset", type=int, default=0, metavar="N",
                       help="add N to every port (15010, 15014, 4318, 8080, 15000, 15001, 15006, 15100, "
                            "18000, 18100)")
    ports.add_argument("--any-ports", action="store_true", help="let every process pick a free port")
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                        help=f"the control plane's and sidecars' state, kept between runs "
                             f"(default {DEFAULT_STATE_DIR})")
    args = parser.parse_args(argv)
    import uvloop

    return uvloop.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
