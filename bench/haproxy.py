"""HAProxy as the reference proxy: one plain process per hop, and the mTLS pair (for the mTLS bench).

Each hop is one ``haproxy -db`` process with ``nbthread 1``, HTTP mode, keep-alive on both sides
(``http-reuse always``), no logging and no header rewriting (it does not add X-Forwarded-For or a
request id as the sidecar does; that is HAProxy's plain forwarding cost). ``new_connections``
makes a hop open (and fully handshake) a new server connection per request, as the sidecar does
with ``pool: {max_idle: 0}``; ``stats_socket`` gives a hop its runtime API, read by ``show_info``.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .procs import Proc, Processes, free_port, wait_for_port

__all__ = ["HaproxyTls", "available", "config", "show_info", "start", "version"]


@dataclass(frozen=True)
class HaproxyTls:
    """Certificate + key in one PEM (HAProxy's ``crt``) and the CA bundle the peer must chain to."""

    crt: Path
    ca_file: Path


def available() -> bool:
    return shutil.which("haproxy") is not None


def version() -> str | None:
    if not available():
        return None
    out = subprocess.run(["haproxy", "-v"], capture_output=True, text=True, timeout=10)
    m = re.search(r"HAProxy version (\S+)", out.stdout)
    return m.group(1) if m else out.stdout.strip().splitlines()[0]


def config(listen_port: int, server_port: int, *, bind_tls: HaproxyTls | None = None,
           server_tls: HaproxyTls | None = None, maxconn: int = 4096, new_connections: bool = False,
           stats_socket: Path | None = None) -> str:
    """One hop: 127.0.0.1:listen_port → 127.0.0.1:server_port.

    bind_tls: terminate mTLS (client certificate required, verified against ca_file).
    server_tls: originate mTLS to the server (present crt, verify the server against ca_file;
    HAProxy cannot match a SPIFFE URI SAN, so only the chain is checked).
    new_connections: close the server connection after each response (the client's stays
    open) and never resume a TLS session to the server: a full handshake per request, as the
    sidecar's ``max_idle: 0`` pool without ``resume_upstream_sessions`` does.
    stats_socket: a Unix socket for HAProxy's runtime API (``show_info``).
    """
    bind = f"127.0.0.1:{listen_port}"
    if bind_tls is not None:
        bind += f" ssl crt {bind_tls.crt} ca-file {bind_tls.ca_file} verify required"
    server = f"127.0.0.1:{server_port} maxconn {maxconn}"
    if server_tls is not None:
        server += f" ssl crt {server_tls.crt} ca-file {server_tls.ca_file} verify required"
        if new_connections:
            server += " no-ssl-reuse"
    backend = "    option http-server-close\n    http-reuse never\n" if new_connections else ""
    stats = f"    stats socket {stats_socket}\n" if stats_socket is not None else ""
    return f"""\
global
    nbthread 1
    maxconn {maxconn}
    tune.ssl.default-dh-param 2048
{stats}
defaults
    mode http
    option http-keep-alive
    http-reuse always
    maxconn {maxconn}
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout http-request 10s
    timeout http-keep-alive 60s

frontend fe
    bind {bind}
    default_backend be

backend be
{backend}    server s1 {server}
"""


def start(procs: Processes, name: str, workdir: Path, server_port: int, *,
          bind_tls: HaproxyTls | None = None, server_tls: HaproxyTls | None = None,
          new_connections: bool = False, stats_socket: Path | None = None,
          wrap: list[str] | None = None, timeout: float = 10.0) -> tuple[Proc, int]:
    """Start one HAProxy hop in front of server_port (under ``wrap``'s command, if given:
    valgrind); returns the process and its listening port."""
    for attempt in range(3):  # free_port() can race with another program taking the port
        port = free_port()
        path = workdir / f"{name}.cfg"
        path.write_text(config(port, server_port, bind_tls=bind_tls, server_tls=server_tls,
                               new_connections=new_connections, stats_socket=stats_socket))
        proc = procs.start(name, [*(wrap or []), "haproxy", "-db", "-f", str(path)], cwd=workdir)
        try:
            wait_for_port(proc, port, timeout)
            return proc, port
        except Exception:
            procs.stop(proc)
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def show_info(stats_socket: Path) -> dict[str, str]:
    """HAProxy's ``show info`` (process counters: ``CumSslConns``, ``SslFrontendSessionReuse_pct``...)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(stats_socket))
        s.sendall(b"show info\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    out = {}
    for line in data.decode(errors="replace").splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out
