"""HAProxy as the reference proxy: one plain process per hop, and the mTLS pair (for the mTLS bench).

Each hop is one ``haproxy -db`` process with ``nbthread 1``, HTTP mode, keep-alive on both sides
(``http-reuse always``), no logging and no header rewriting (it does not add X-Forwarded-For or a
request id as the sidecar does; that is HAProxy's plain forwarding cost).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .procs import Proc, Processes, free_port, wait_for_port

__all__ = ["HaproxyTls", "available", "config", "start", "version"]


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
           server_tls: HaproxyTls | None = None, maxconn: int = 4096) -> str:
    """One hop: 127.0.0.1:listen_port → 127.0.0.1:server_port.

    bind_tls: terminate mTLS (client certificate required, verified against ca_file).
    server_tls: originate mTLS to the server (present crt, verify the server against ca_file;
    HAProxy cannot match a SPIFFE URI SAN, so only the chain is checked).
    """
    bind = f"127.0.0.1:{listen_port}"
    if bind_tls is not None:
        bind += f" ssl crt {bind_tls.crt} ca-file {bind_tls.ca_file} verify required"
    server = f"127.0.0.1:{server_port} maxconn {maxconn}"
    if server_tls is not None:
        server += f" ssl crt {server_tls.crt} ca-file {server_tls.ca_file} verify required"
    return f"""\
global
    nbthread 1
    maxconn {maxconn}
    tune.ssl.default-dh-param 2048

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
    server s1 {server}
"""


def start(procs: Processes, name: str, workdir: Path, server_port: int, *,
          bind_tls: HaproxyTls | None = None, server_tls: HaproxyTls | None = None) -> tuple[Proc, int]:
    """Start one HAProxy hop in front of server_port; returns the process and its listening port."""
    for attempt in range(3):  # free_port() can race with another program taking the port
        port = free_port()
        path = workdir / f"{name}.cfg"
        path.write_text(config(port, server_port, bind_tls=bind_tls, server_tls=server_tls))
        proc = procs.start(name, ["haproxy", "-db", "-f", str(path)], cwd=workdir)
        try:
            wait_for_port(proc, port)
            return proc, port
        except Exception:
            procs.stop(proc)
            if attempt == 2:
                raise
    raise AssertionError("unreachable")
