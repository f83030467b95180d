"""Sidecar processes for the benchmark: config files in a temp dir, start, learn the ports.

``plain_files`` makes the plain-HTTP configs; ``mtls_files`` is where the mTLS configs are made
(certificates from ``pakectl``), so the mTLS variants of the paths in ``run.py`` are a matter of
calling it instead. ``with_access_log`` and ``with_policy`` turn the features on that a path
measures; ``check_mtls``, ``request_status`` and ``metric_values`` are how a path shows that
what it measures is really on.
"""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .procs import Proc, Processes, json_event

__all__ = ["MtlsMaterial", "SidecarFiles", "check_mtls", "make_mtls_material", "metric_values",
           "metrics_requests", "mtls_files", "plain_files", "request_status", "start", "with_access_log",
           "with_policy"]

TRUST_DOMAIN = "pake.local"


@dataclass(frozen=True)
class SidecarFiles:
    """The two documents one sidecar reads: its bootstrap and its (static) mesh."""

    name: str  # process / directory name
    bootstrap: dict[str, Any]
    mesh: dict[str, Any]


def _bootstrap(service: str, *, app: str | None, inbound_tls: bool, with_inbound: bool,
               with_outbound: bool, tls: dict[str, str] | None) -> dict[str, Any]:
    listeners: dict[str, Any] = {"admin": "127.0.0.1:0"}
    if with_outbound:
        listeners["outbound"] = "127.0.0.1:0"
    if with_inbound:
        listeners["inbound"] = {"address": "127.0.0.1:0", "tls": inbound_tls}
    doc: dict[str, Any] = {
        "service": service,
        "listeners": listeners,
        "mesh": "mesh.yaml",
        "access_log": {"enabled": False},  # the targets: metrics on, access log off
        "timeouts": {"drain": "2s"},  # SIGTERM at the end of a path should not wait 20 s
    }
    if app is not None:
        doc["app"] = app
    if tls is not None:
        doc["tls"] = tls
    return doc


def _mesh(service: str, endpoint: str) -> dict[str, Any]:
    return {"trust_domain": TRUST_DOMAIN,
            "services": {service: {"endpoints": [endpoint], "hosts": ["127.0.0.1", service]}}}


def plain_files(*, inbound_app_port: int | None = None, outbound_to_port: int | None = None,
                name: str = "sidecar") -> SidecarFiles:
    """A plain-HTTP sidecar: an inbound listener forwarding to the app at inbound_app_port,
    and/or an outbound listener routing Host 127.0.0.1 (service ``up``) to outbound_to_port."""
    endpoint = outbound_to_port if outbound_to_port is not None else inbound_app_port
    assert endpoint is not None
    service = "up" if inbound_app_port is not None else "front"
    boot = _bootstrap(service, app=f"127.0.0.1:{inbound_app_port}" if inbound_app_port is not None else None,
                      inbound_tls=False, with_inbound=inbound_app_port is not None,
                      with_outbound=outbound_to_port is not None, tls=None)
    return SidecarFiles(name, boot, _mesh("up", f"127.0.0.1:{endpoint}"))


def with_access_log(files: SidecarFiles, path: Path | None) -> SidecarFiles:
    """The access log on: to the file at path, or (None) the sidecar's default, which is what
    the quickstart runs with: on, to stdout."""
    boot = {k: v for k, v in files.bootstrap.items() if k != "access_log"}
    if path is not None:
        boot["access_log"] = {"enabled": True, "path": str(path)}
    return SidecarFiles(files.name, boot, files.mesh)


def with_policy(files: SidecarFiles, policy: dict[str, Any], audit: Path) -> SidecarFiles:
    """An RBAC policy on the sidecar's own service (its inbound enforces it), with the audit
    records (one per decision, allow and deny alike: a policy's default) to the file at audit."""
    service = files.bootstrap["service"]
    mesh = {**files.mesh, "services": {name: ({**node, "policy": policy} if name == service else node)
                                       for name, node in files.mesh["services"].items()}}
    if service not in mesh["services"]:
        raise ValueError(f"{files.name}: no service {service!r} in its mesh to put the policy on")
    return SidecarFiles(files.name, {**files.bootstrap, "audit": {"path": str(audit)}}, mesh)


# === mTLS (issue 3) ======================================================================


@dataclass(frozen=True)
class MtlsMaterial:
    """A CA and workload certificates for ``front`` (the client side) and ``up`` (the server side)."""

    ca_dir: Path
    bundle: Path
    certs: dict[str, tuple[Path, Path]]  # service -> (cert, key)

    def haproxy_crt(self, service: str, out: Path) -> Path:
        """HAProxy wants certificate and key in one file."""
        cert, key = self.certs[service]
        out.write_bytes(cert.read_bytes() + key.read_bytes())
        out.chmod(0o600)
        return out


def _pakectl() -> list[str]:
    script = Path(sys.executable).parent / "pakectl"
    return [str(script)] if script.exists() else [sys.executable, "-m", "control"]


def make_mtls_material(workdir: Path, services: tuple[str, ...] = ("front", "up")) -> MtlsMaterial:
    """``pakectl ca init`` + ``pakectl certs issue`` for each service, into workdir."""
    ca_dir = workdir / "ca"

    def run(*args: str) -> None:
        out = subprocess.run([*_pakectl(), *args], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"pakectl {' '.join(args)}: {out.stderr.strip() or out.stdout.strip()}")

    run("ca", "init", "--state-dir", str(ca_dir))
    certs = {}
    for service in services:
        out = workdir / f"certs-{service}"
        run("certs", "issue", "--service", service, "--out", str(out), "--state-dir", str(ca_dir))
        certs[service] = (out / f"{service}.pem", out / f"{service}-key.pem")
    return MtlsMaterial(ca_dir=ca_dir, bundle=ca_dir / "bundle.pem", certs=certs)


def mtls_files(material: MtlsMaterial, *, inbound_app_port: int | None = None,
               outbound_to_port: int | None = None, name: str = "sidecar") -> SidecarFiles:
    """The mTLS counterpart of plain_files: sidecar-to-sidecar traffic is mTLS.

    The server side (``up``) terminates mTLS on its inbound listener; the client side (``front``)
    presents its certificate and originates mTLS to the ``up`` endpoint, expecting the identity
    spiffe://pake.local/service/up. The sidecar decides to originate TLS from its bootstrap
    ``tls`` block; if the mesh schema grows a per-service switch for it, set it here.
    """
    files = plain_files(inbound_app_port=inbound_app_port, outbound_to_port=outbound_to_port, name=name)
    service = files.bootstrap["service"]
    cert, key = material.certs[service]
    boot = dict(files.bootstrap)
    boot["tls"] = {"cert": str(cert), "key": str(key), "bundle": str(material.bundle)}
    if "inbound" in boot["listeners"]:
        boot["listeners"] = {**boot["listeners"], "inbound": {"address": "127.0.0.1:0", "tls": True}}
    return SidecarFiles(name, boot, files.mesh)


def _client_context(material: MtlsMaterial, client: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # mesh peers are checked by SPIFFE ID, not host name
    ctx.load_verify_locations(material.bundle)
    ctx.load_cert_chain(*material.certs[client])
    return ctx


def check_mtls(material: MtlsMaterial, port: int, client: str = "front") -> str:
    """Handshake with the mTLS listener on port as ``client``, to show that the benchmarked hop
    really is mTLS; returns the TLS version and cipher. Raises if it is not TLS."""
    ctx = _client_context(material, client)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw) as tls:
            cipher = tls.cipher()
            return f"{tls.version()} {cipher[0] if cipher else ''}".strip()


def request_status(port: int, *, material: MtlsMaterial | None = None, client: str = "front",
                   path: str = "/") -> int:
    """The status of one ``GET path`` to 127.0.0.1:port: plain HTTP, or with material over mTLS
    as ``client`` (a workload with that service's certificate)."""
    conn: http.client.HTTPConnection
    if material is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5,
                                           context=_client_context(material, client))
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


# === processes ==========================================================================


REPO = Path(__file__).resolve().parent.parent


def argv(bootstrap: Path) -> list[str]:
    return [sys.executable, "-m", "sidecar", "run", "-c", str(bootstrap)]


def env() -> dict[str, str]:
    """The sidecar of this checkout first on the path: the benchmark measures the code it sits
    beside, not whatever ``pake-sidecar`` the environment installed (an editable install of
    another worktree, say)."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO)}


def start(procs: Processes, files: SidecarFiles, workdir: Path, timeout: float = 15.0,
          wrap: list[str] | None = None) -> tuple[Proc, dict[str, int]]:
    """Write the configs into workdir/<name>/, start the sidecar (under ``wrap``'s command, if
    given: valgrind), wait for its ready line."""
    d = workdir / files.name
    d.mkdir(parents=True, exist_ok=True)
    (d / "sidecar.yaml").write_text(yaml.safe_dump(files.bootstrap, sort_keys=False))
    (d / "mesh.yaml").write_text(yaml.safe_dump(files.mesh, sort_keys=False))
    proc = procs.start(files.name, [*(wrap or []), *argv(d / "sidecar.yaml")], cwd=d, env=env())
    ready = proc.wait_for_stdout(json_event("ready"), timeout)
    assert isinstance(ready, dict)
    ports = {k: int(v) for k, v in dict(ready.get("ports", {})).items()}
    return proc, ports


def metric_values(admin_port: int) -> dict[str, float] | None:
    """Every sample of the sidecar's /metrics, keyed by its series as written
    (``pake_audit_records_total{fate="written"}``); None if /metrics could not be read."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # ignore HTTP_PROXY
    try:
        with opener.open(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            try:
                out[series] = float(value)
            except ValueError:
                continue
    return out


def metrics_requests(admin_port: int) -> int | None:
    """Requests the sidecar counted (sum of pake_requests_total), a cross-check that traffic passed
    through it with metrics on; None if /metrics could not be read."""
    values = metric_values(admin_port)
    if values is None:
        return None
    return int(sum(v for k, v in values.items() if k.startswith("pake_requests_total{")))
