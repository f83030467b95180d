"""The mTLS quickstart (``examples/mtls/``) as a user runs it without a control plane: ``make
certs`` (``python -m examples.certs``), then the two sidecars from the committed files, as
real processes (listeners moved to port 0, certificates in a temporary folder, so it neither
needs free fixed ports nor touches examples/mtls/certs). ``make demo`` (the same mesh joined
to a control plane) is tests/integration/test_demo_control.py."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp.test_utils import TestServer
from cryptography import x509

from certs.pem import load_certificate
from examples.echo import make_app
from tests.helpers.sidecar_process import SidecarProcess

_ROOT = Path(__file__).resolve().parents[2]
FRONTEND_ID = "spiffe://pake.local/service/frontend"
EXAMPLE = _ROOT / "examples" / "mtls"


async def _run(*argv: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *argv, cwd=_ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_make_certs_is_idempotent_and_keys_are_private(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    out = await _run("-m", "examples.certs", "--out", str(certs))
    assert "$ pakectl ca init" in out and out.count("$ pakectl certs issue") == 3
    assert "$ pakectl certs issue --service gateway" in out  # the gateway's mTLS identity
    assert (certs / "ca").stat().st_mode & 0o777 == 0o700
    for key in ("ca/ca-key.pem", "frontend-key.pem", "echo-key.pem", "gateway-key.pem",
                "demo-gateway-server-key.pem"):
        assert (certs / key).stat().st_mode & 0o777 == 0o600, key
    serials = {s: load_certificate(certs / f"{s}.pem").serial_number
               for s in ("frontend", "echo", "gateway", "demo-gateway-server")}
    # the outside listener's certificate: self-signed, for localhost and 127.0.0.1, named a demo
    server = load_certificate(certs / "demo-gateway-server.pem")
    assert server.issuer == server.subject and "DEMO" in server.subject.rfc4514_string()
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]

    out = await _run("-m", "examples.certs", "--out", str(certs))
    assert "nothing to do" in out and "pakectl" not in out
    # A broken file is repaired; the rest is left alone.
    (certs / "echo-key.pem").unlink()
    out = await _run("-m", "examples.certs", "--out", str(certs))
    assert out.count("$ pakectl certs issue --service echo") == 1 and "frontend" not in out
    assert load_certificate(certs / "frontend.pem").serial_number == serials["frontend"]
    assert load_certificate(certs / "echo.pem").serial_number != serials["echo"]
    # the demo server certificate too: a mismatched key is repaired, the workloads untouched
    (certs / "demo-gateway-server-key.pem").write_bytes((certs / "echo-key.pem").read_bytes())
    out = await _run("-m", "examples.certs", "--out", str(certs))
    assert "re-making the demo gateway server certificate" in out and "pakectl" not in out
    assert load_certificate(certs / "demo-gateway-server.pem").serial_number != serials["demo-gateway-server"]
    assert load_certificate(certs / "gateway.pem").serial_number == serials["gateway"]


async def test_the_static_mtls_quickstart_runs_from_its_files(tmp_path: Path) -> None:
    """examples/mtls/ as committed (listeners moved to port 0): frontend -> mTLS -> echo."""
    certs = tmp_path / "certs"
    await _run("-m", "examples.certs", "--out", str(certs))
    mesh = yaml.safe_load((EXAMPLE / "mesh.yaml").read_text())
    mesh["jwt_providers"]["pake-issuer"]["jwks_file"] = str(_ROOT / "examples" / "gateway" / "jwks.json")
    tls = {"cert": "", "key": "", "bundle": str(certs / "bundle.pem")}

    def bootstrap(name: str, listeners: dict[str, Any]) -> dict[str, Any]:
        boot = yaml.safe_load((EXAMPLE / f"{name}.yaml").read_text())
        assert set(boot["listeners"]) == set(listeners)  # the committed file's listeners
        return {**boot, "listeners": listeners,
                "tls": {**tls, "cert": str(certs / f"{name}.pem"), "key": str(certs / f"{name}-key.pem")}}

    async with TestServer(make_app(), host="127.0.0.1", port=0) as app:
        echo = SidecarProcess(tmp_path, name="echo", mesh=mesh, bootstrap={
            **bootstrap("echo", {"inbound": {"address": "127.0.0.1:0", "tls": True},
                                 "admin": "127.0.0.1:0"}), "app": f"127.0.0.1:{app.port}"})
        async with echo:
            mesh["services"]["echo"]["endpoints"] = [f"127.0.0.1:{echo.ports['inbound']}"]
            frontend = SidecarProcess(tmp_path, name="frontend", mesh=mesh, bootstrap=bootstrap(
                "frontend", {"outbound": "127.0.0.1:0", "admin": "127.0.0.1:0"}))
            async with frontend, aiohttp.ClientSession() as http:
                async with http.get("http://echo/hello", proxy=frontend.url()) as resp:
                    assert resp.status == 200
                    seen = {k.lower(): v for k, v in (await resp.json())["headers"].items()}
                assert seen["x-pake-peer-identity"] == FRONTEND_ID  # echo's sidecar verified it
                async with http.get(frontend.url() + "/echo/admin/stats", headers={"Host": "echo"}) as resp:
                    assert resp.status == 403  # echo's policy: /echo/admin/ needs role admin
                    assert (await resp.json())["service"] == "echo"
