"""``python -m examples.demo`` (``make demo``): the mTLS quickstart mesh on loopback, with the
gateway in front of it.

Makes the certificates if missing (``examples.certs``), then starts, in this order and each
only once the one before said it is ready (no fixed sleeps): the echo app, the ``echo``
sidecar (mTLS inbound in front of the app; it enforces echo's policy), the ``gateway``
(outside clients with a JWT or the demo API key; ``/echo/`` goes over mTLS to the echo
sidecar) and the ``frontend`` sidecar (plain outbound for its app; Host ``echo`` goes over
mTLS to the echo sidecar). It sends requests through both paths to show that they work,
prints how to try them, and on Ctrl-C or SIGTERM stops the processes in reverse order (a
sidecar drains; nothing is left running).

The configs are ``examples/mtls/*.yaml`` and ``examples/gateway/sidecar.yaml`` with its
``mesh.yaml``. The gateway serves what its example file says: plain HTTP on 18000 as
committed (so the curl lines work without a certificate), or TLS with the demo server
certificate from ``make certs`` if the commented form there is used instead.
``--ports-offset N`` moves every port by N when the default ones are taken; ``--any-ports``
lets every process pick a free port (tests use this) and wires the next one to what the
previous one bound. The configs the processes run are written to a temporary directory,
with the ports, certificate and key-set paths filled in.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from examples.certs import DEFAULT_DIR, DEMO_SERVER_CERT, DEMO_SERVER_KEY, ensure_certs
from examples.mint_token import mint

__all__ = ["main"]

HERE = Path(__file__).resolve().parent / "mtls"
GATEWAY = HERE.parent / "gateway"
ROOT = HERE.parents[1]
READY_TIMEOUT = 20.0  # per process: a cold Python start and imports, on a slow machine
STOP_TIMEOUT = 25.0  # a sidecar's drain deadline (20 s by default) and a margin
_ECHO_READY = re.compile(r"echo app listening on http://[\d.]+:(\d+)")


class DemoError(Exception):
    """A process did not start; the message says which and shows its last lines."""


class Child:
    """One subprocess: its output goes to ours, prefixed with its name, and a line that
    ``ready(line)`` recognises resolves ``port_info``."""

    def __init__(self, name: str, argv: list[str], ready: Callable[[str], dict[str, int] | None]) -> None:
        self.name = name
        self.argv = argv
        self._ready = ready
        self.proc: asyncio.subprocess.Process | None = None
        self.ports: dict[str, int] = {}
        self.tail: list[str] = []  # the last lines, for a start-up error
        self._ready_event = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None

    async def start(self, cwd: Path) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               "PYTHONUNBUFFERED": "1"}
        # A session of its own: Ctrl-C reaches only the demo, which stops the mesh in order.
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True, limit=1 << 20)
        print(f"[demo] started {self.name} (pid {self.proc.pid})", flush=True)
        self._pump = asyncio.create_task(self._read())
        waiter = asyncio.create_task(self._ready_event.wait())
        exited = asyncio.create_task(self.proc.wait())
        try:
            await asyncio.wait({waiter, exited}, timeout=READY_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            exited.cancel()
        if not self._ready_event.is_set():
            if self.proc.returncode is not None:  # its last words are still in the pipe
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2):
                        await self._pump
                why = f"exited with status {self.proc.returncode}"
            else:
                why = f"did not become ready within {READY_TIMEOUT}s"
            last = "\n  ".join(self.tail[-8:]) or "(no output)"
            raise DemoError(f"{self.name} {why} (a port in use? try --ports-offset N):\n  {last}")

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            text = line.decode(errors="replace").rstrip()
            self.tail = [*self.tail[-19:], text]
            print(f"[{self.name}] {text}", flush=True)
            if not self._ready_event.is_set():
                ports = self._ready(text)
                if ports is not None:
                    self.ports = ports
                    self._ready_event.set()

    async def stop(self) -> int | None:
        """SIGTERM, wait (a sidecar drains first), then SIGKILL if it is still there."""
        proc = self.proc
        if proc is None:
            return None
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(STOP_TIMEOUT):
                    await proc.wait()
            except TimeoutError:
                print(f"[demo] {self.name} did not stop in {STOP_TIMEOUT}s: killing it", flush=True)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._pump is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self._pump
        print(f"[demo] {self.name} exited ({proc.returncode})", flush=True)
        return proc.returncode


def _sidecar_ready(line: str) -> dict[str, int] | None:
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if event.get("event") == "ready":
        return {str(k): int(v) for k, v in event["ports"].items()}
    return None


def _echo_ready(line: str) -> dict[str, int] | None:
    match = _ECHO_READY.search(line)
    return {"http": int(match.group(1))} if match else None


def _address(host_port: str, shift: int | None) -> str:
    """``host:port`` with the port moved by ``shift``, or 0 (any) when shift is None."""
    host, _, port = host_port.rpartition(":")
    return f"{host}:{0 if shift is None else int(port) + shift}"


def _write_sidecar(run: Path, name: str, certs: Path, shift: int | None, *,
                   app: str | None = None, echo_endpoint: str | None = None,
                   example: Path = HERE, bootstrap: str | None = None) -> Path:
    """The example's ``<name>.yaml`` (or ``bootstrap``) and mesh.yaml with ports, certificate
    and key-set paths filled in."""
    boot: dict[str, Any] = yaml.safe_load((example / (bootstrap or f"{name}.yaml")).read_text())
    mesh: dict[str, Any] = yaml.safe_load((example / boot["mesh"]).read_text())
    for key, value in boot["listeners"].items():
        if isinstance(value, dict):
            value["address"] = _address(value["address"], shift)
            if isinstance(value.get("tls"), dict):  # the gateway's server certificate: make certs'
                value["tls"] = {"cert": str(certs / DEMO_SERVER_CERT), "key": str(certs / DEMO_SERVER_KEY)}
        else:
            boot["listeners"][key] = _address(value, shift)
    if app is not None:
        boot["app"] = app
    boot["mesh"] = f"mesh-{name}.yaml"
    boot["tls"] = {"cert": str(certs / f"{name}.pem"), "key": str(certs / f"{name}-key.pem"),
                   "bundle": str(certs / "bundle.pem")}
    for provider in mesh.get("jwt_providers", {}).values():  # relative to the example's mesh
        if "jwks_file" in provider:
            provider["jwks_file"] = str((example / provider["jwks_file"]).resolve())
    echo = mesh["services"]["echo"]
    echo["endpoints"] = [echo_endpoint or _address(e, shift or 0) for e in echo["endpoints"]]
    (run / f"mesh-{name}.yaml").write_text(yaml.safe_dump(mesh, sort_keys=False))
    path = run / f"{name}.yaml"
    path.write_text(yaml.safe_dump(boot, sort_keys=False))
    return path


async def _exchange(port: int, request: bytes,
                    tls: ssl.SSLContext | None = None) -> tuple[str, dict[str, str] | None]:
    """One request, as curl would send it: the status, and the headers the echo app saw (None
    when the answer is not the echo app's)."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=tls, server_hostname="localhost" if tls is not None else None)
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


async def _check(outbound: int) -> str:
    """One request through frontend -> echo (absolute-form target, as curl -x sends it)."""
    status, seen = await _exchange(
        outbound, b"GET http://echo/hello HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n")
    peer = "?" if seen is None else seen.get("x-pake-peer-identity", "none")
    return f"GET http://echo/hello -> {status}; the echo app saw x-pake-peer-identity: {peer}"


async def _check_gateway(port: int, tls: ssl.SSLContext | None) -> list[str]:
    """Through the gateway with demo tokens: an admin may use /echo/admin/, a reader not."""
    lines = []
    for path, sub, role in (("/echo/hello", "alice", "admin"), ("/echo/admin/stats", "bob", "reader")):
        token = mint(sub, [role], ttl=300)
        status, seen = await _exchange(port, (
            f"GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\nAuthorization: Bearer {token}\r\n"
            "Connection: close\r\n\r\n").encode(), tls)
        line = f"gateway: GET {path} as {sub} (role {role}) -> {status}"
        if seen is not None:
            line += (f"; the echo app saw x-user: {seen.get('x-user', 'none')}, "
                     f"x-pake-peer-identity: {seen.get('x-pake-peer-identity', 'none')}")
        lines.append(line)
    return lines


def _gateway_tls(config: Path, certs: Path) -> ssl.SSLContext | None:
    """A client context trusting the demo server certificate, if the gateway serves TLS."""
    listener = yaml.safe_load(config.read_text())["listeners"]["gateway"]
    if not (isinstance(listener, dict) and listener.get("tls")):
        return None
    return ssl.create_default_context(cafile=str(certs / DEMO_SERVER_CERT))


def _gateway_help(port: int, tls: ssl.SSLContext | None, certs: Path) -> str:
    if tls is None:
        curl, base = "curl", f"http://127.0.0.1:{port}"
        note = ("  (plain HTTP, as in examples/gateway/sidecar.yaml; its commented listener form serves"
                f" TLS with {certs / DEMO_SERVER_CERT}, a DEMO certificate)")
    else:
        curl, base = f"curl --cacert {certs / DEMO_SERVER_CERT}", f"https://localhost:{port}"
        note = f"  (TLS with the DEMO server certificate {certs / DEMO_SERVER_CERT})"
    return f"""[demo] the gateway: outside callers bring a JWT or the demo API key; /echo/ goes over mTLS to echo
{note}
  TOKEN=$(.venv/bin/python -m examples.mint_token --sub alice --role admin)
  {curl} -H "Authorization: Bearer $TOKEN" {base}/echo/hello                # 200
  {curl} -H "Authorization: Bearer $TOKEN" {base}/echo/admin/stats          # 200: role admin
  READER=$(.venv/bin/python -m examples.mint_token --sub bob --role reader)
  {curl} -H "Authorization: Bearer $READER" {base}/echo/admin/stats         # 403: only role admin
  {curl} -H "x-api-key: pake-demo-api-key-never-use-elsewhere" {base}/echo/hello   # 200
  {curl} {base}/echo/hello                                                   # 401: no credentials"""


async def run(args: argparse.Namespace) -> int:
    certs = Path(args.certs).resolve()
    ensure_certs(certs)
    shift: int | None = None if args.any_ports else args.ports_offset
    run_dir = Path(tempfile.mkdtemp(prefix="pake-demo-"))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    children: list[Child] = []
    code = 0
    try:
        app_port = 0 if shift is None else 8080 + shift
        app = Child("echo-app", [sys.executable, "-m", "examples.demo", "--serve-echo", str(app_port)],
                    _echo_ready)
        children.append(app)
        await _until(app.start(run_dir), stop)
        echo_cfg = _write_sidecar(run_dir, "echo", certs, shift, app=f"127.0.0.1:{app.ports['http']}")
        echo = Child("echo-sidecar", [sys.executable, "-m", "sidecar", "run", "-c", str(echo_cfg)],
                     _sidecar_ready)
        children.append(echo)
        await _until(echo.start(run_dir), stop)
        gw_cfg = _write_sidecar(run_dir, "gateway", certs, shift, example=GATEWAY, bootstrap="sidecar.yaml",
                                echo_endpoint=f"127.0.0.1:{echo.ports['inbound']}")
        gateway = Child("gateway", [sys.executable, "-m", "sidecar", "run", "-c", str(gw_cfg)],
                        _sidecar_ready)
        children.append(gateway)
        await _until(gateway.start(run_dir), stop)
        front_cfg = _write_sidecar(run_dir, "frontend", certs, shift,
                                   echo_endpoint=f"127.0.0.1:{echo.ports['inbound']}")
        front = Child("frontend-sidecar", [sys.executable, "-m", "sidecar", "run", "-c", str(front_cfg)],
                      _sidecar_ready)
        children.append(front)
        await _until(front.start(run_dir), stop)
        outbound = front.ports["outbound"]
        print(f"[demo] {await _check(outbound)}", flush=True)
        gw_tls, gw_port = _gateway_tls(gw_cfg, certs), gateway.ports["gateway"]
        for line in await _check_gateway(gw_port, gw_tls):
            print(f"[demo] {line}", flush=True)
        print(f"""
[demo] the mTLS mesh is up (configs in {run_dir}):
  curl -x http://127.0.0.1:{outbound} http://echo/hello
  curl -H 'Host: echo' http://127.0.0.1:{outbound}/hello
  curl http://127.0.0.1:{front.ports['admin']}/config     # frontend's certificate: subject, SAN, serial, expiry
  curl http://127.0.0.1:{echo.ports['admin']}/metrics    # pake_tls_handshakes_total, ..._failures_total
  curl -k https://127.0.0.1:{echo.ports['inbound']}/      # no client certificate: refused in the handshake
{_gateway_help(gw_port, gw_tls, certs)}
[demo] Ctrl-C stops everything.
[demo] demo ready outbound={outbound} gateway={gw_port}""", flush=True)
        await stop.wait()
        print("[demo] stopping", flush=True)
    except _Stopped:
        print("[demo] stopping", flush=True)
    except DemoError as exc:
        print(f"[demo] {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        for child in reversed(children):  # the frontend first: nothing new reaches the others
            await child.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
    print("[demo] stopped", flush=True)
    return code


class _Stopped(Exception):
    """Ctrl-C while a process was still starting."""


async def _until(starting: Any, stop: asyncio.Event) -> None:
    """Wait for a process to become ready, unless Ctrl-C comes first."""
    start = asyncio.ensure_future(starting)
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({start, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not start.done():
        start.cancel()
        with contextlib.suppress(asyncio.CancelledError, DemoError):
            await start
        raise _Stopped()
    start.result()


def serve_echo(port: int) -> None:
    """The echo app on a socket we bind ourselves, so that port 0 reports the real port."""
    from aiohttp import web

    from examples.echo import make_app

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    bound = sock.getsockname()[1]
    web.run_app(make_app(), sock=sock, access_log=None, handle_signals=True,
                print=lambda *_: print(f"echo app listening on http://127.0.0.1:{bound}", flush=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.demo", description=__doc__.split("\n")[0])
    ports = parser.add_mutually_exclusive_group()
    ports.add_argument("--ports-offset", type=int, default=0, metavar="N",
                       help="add N to every port (8080, 15000, 15001, 15006, 15100, 18000, 18100)")
    ports.add_argument("--any-ports", action="store_true", help="let every process pick a free port")
    parser.add_argument("--certs", type=Path, default=DEFAULT_DIR, help=f"certificates (default {DEFAULT_DIR})")
    parser.add_argument("--serve-echo", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_echo is not None:
        serve_echo(args.serve_echo)
        return 0
    import uvloop

    return uvloop.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
