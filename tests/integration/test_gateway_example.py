"""The gateway example (``examples/gateway/``) as a user runs it, on ports 0 in a temp copy.

The example's own files are used as they are; only what cannot be committed or shared is
made here: the certificates its ``tls`` block names (``../mtls/certs/``, which ``make certs``
makes in the repository and git ignores) and the listener ports (rewritten to 0). The e2e
case runs the whole path of the README: a client with a token from ``examples.mint_token``
-> the gateway -> mTLS with the gateway's identity -> the echo service's sidecar, which
enforces ``echo``'s policy from the same mesh file -> the echo app.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import yaml
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization

from tests.helpers.pki import make_test_pki
from examples.echo import make_app
from examples.mint_token import mint
from tests.helpers.sidecar_process import SidecarProcess

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "gateway"
GATEWAY_ID = "spiffe://pake.local/service/gateway"


def demo_api_key() -> str:
    """The plain demo key, as the README gives it to the reader."""
    match = re.search(r"x-api-key: (pake-demo-[A-Za-z0-9-]+)", (EXAMPLE / "README.md").read_text())
    assert match, "README.md shows the demo API key in an x-api-key header"
    return match.group(1)


def example_copy(tmp_path: Path) -> Path:
    """examples/gateway copied to tmp/gateway, with the certificates its bootstrap names."""
    shutil.copytree(EXAMPLE, tmp_path / "gateway")
    make_test_pki(tmp_path / "mtls", services=["gateway", "echo", "frontend"])  # -> mtls/certs/
    return tmp_path / "gateway"


async def run(*argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *argv, cwd=str(ROOT), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# === the files ===========================================================================


async def test_the_example_config_passes_check(tmp_path: Path) -> None:
    copy = example_copy(tmp_path)
    code, out, err = await run("-m", "sidecar", "check", "-c", str(copy / "sidecar.yaml"))
    assert code == 0, err
    assert out.startswith(f"ok: {copy / 'sidecar.yaml'}") and "2 services" in out


def test_the_demo_key_set_and_api_key_agree_with_the_config() -> None:
    mesh = yaml.safe_load((EXAMPLE / "mesh.yaml").read_text())
    # jwks.json is the public half of the demo signing key, under kid demo-1
    private = serialization.load_pem_private_key((EXAMPLE / "demo-signing-key.pem").read_bytes(),
                                                 password=None)
    (key,) = json.loads((EXAMPLE / "jwks.json").read_text())["keys"]
    assert (key["kid"], key["alg"], key["use"], key["kty"]) == ("demo-1", "RS256", "sig", "RSA")
    assert "d" not in key  # public members only
    public = jwt.PyJWK(key).key
    assert public.public_numbers() == private.public_key().public_numbers()  # type: ignore[union-attr]
    provider = mesh["jwt_providers"]["pake-issuer"]
    assert (provider["issuer"], provider["audiences"], provider["algorithms"],
            provider["jwks_file"]) == ("https://issuer.pake.local", ["pake"], ["RS256"], "jwks.json")
    # the config holds the demo API key's hash, never the key
    api_key = demo_api_key()
    digest = hashlib.sha256(api_key.encode()).hexdigest()
    assert mesh["api_keys"]["demo-key"]["hash"] == f"sha256:{digest}"
    assert api_key not in (EXAMPLE / "mesh.yaml").read_text()


async def test_mint_token_prints_a_token_the_example_provider_accepts() -> None:
    code, out, err = await run("-m", "examples.mint_token", "--sub", "alice", "--role", "admin",
                               "--ttl", "5m")
    assert code == 0, err
    token = out.strip()
    (key,) = json.loads((EXAMPLE / "jwks.json").read_text())["keys"]
    assert jwt.get_unverified_header(token) == {"alg": "RS256", "kid": "demo-1", "typ": "JWT"}
    claims = jwt.decode(token, jwt.PyJWK(key).key, algorithms=["RS256"], audience="pake",
                        issuer="https://issuer.pake.local")
    assert claims["sub"] == "alice" and claims["roles"] == ["admin"]
    assert claims["exp"] - claims["iat"] == 300
    code, _, err = await run("-m", "examples.mint_token", "--sub", "alice", "--ttl", "10")
    assert code == 2 and "duration" in err  # a bare number is refused, as in the mesh config


# === the example running =================================================================


def _seen(body: dict[str, Any]) -> dict[str, str]:
    return {k.lower(): v for k, v in body["headers"].items()}


async def test_the_example_gateway_in_front_of_the_echo_sidecar(tmp_path: Path) -> None:
    copy = example_copy(tmp_path)
    boot = yaml.safe_load((copy / "sidecar.yaml").read_text())
    mesh = yaml.safe_load((copy / "mesh.yaml").read_text())
    boot["listeners"] = {"gateway": "127.0.0.1:0", "admin": "127.0.0.1:0"}  # else as written
    _, admin_token, _ = await run("-m", "examples.mint_token", "--sub", "alice", "--role", "admin")
    reader = {"Authorization": "Bearer " + mint("bob", ["reader"], extra={"email": "bob@pake.local"})}
    admin = {"Authorization": "Bearer " + admin_token.strip()}
    _, expired_token, _ = await run("-m", "examples.mint_token", "--sub", "alice", "--ttl=-5m")
    expired = {"Authorization": "Bearer " + expired_token.strip()}

    async with TestServer(make_app(), host="127.0.0.1", port=0) as app:
        # echo's sidecar reads the same mesh file, so it enforces the same `echo` policy
        echo = SidecarProcess(tmp_path, name="echo", mesh=mesh, bootstrap={
            "service": "echo", "app": f"127.0.0.1:{app.port}",
            "listeners": {"inbound": {"address": "127.0.0.1:0", "tls": True}, "admin": "127.0.0.1:0"},
            "tls": {"cert": "../mtls/certs/echo.pem", "key": "../mtls/certs/echo-key.pem",
                    "bundle": "../mtls/certs/bundle.pem"}})
        shutil.copy(EXAMPLE / "jwks.json", echo.dir / "jwks.json")
        async with echo:
            inbound = f"127.0.0.1:{echo.ports['inbound']}"
            mesh["services"]["echo"]["endpoints"] = [inbound]
            gateway = SidecarProcess(tmp_path, name="gateway", bootstrap=boot, mesh=mesh)
            frontend = SidecarProcess(tmp_path, name="frontend", mesh=mesh, bootstrap={
                "service": "frontend",
                "tls": {"cert": "../mtls/certs/frontend.pem", "key": "../mtls/certs/frontend-key.pem",
                        "bundle": "../mtls/certs/bundle.pem"}})
            # every sidecar of the mesh loads the key set, even one that verifies no token
            for sc in (gateway, frontend):
                shutil.copy(EXAMPLE / "jwks.json", sc.dir / "jwks.json")
            async with gateway, frontend, aiohttp.ClientSession() as http:
                url = gateway.url("gateway")
                async with http.get(url + "/echo/admin/stats", headers=admin) as resp:
                    assert resp.status == 200
                    seen = _seen(await resp.json())
                    admin_id = resp.headers["x-request-id"]
                assert seen["x-user"] == "alice" and seen["x-pake-roles"] == "admin"
                assert seen["x-pake-peer-identity"] == GATEWAY_ID  # mTLS with its own identity

                async with http.get(url + "/echo/hello", headers=reader) as resp:
                    assert resp.status == 200
                    seen = _seen(await resp.json())
                assert seen["x-user"] == "bob" and seen["x-user-email"] == "bob@pake.local"
                async with http.get(url + "/echo/admin/stats", headers=reader) as resp:
                    assert resp.status == 403
                    assert (await resp.json())["service"] == "gateway"  # stopped at the edge

                async with http.get(url + "/echo/hello", headers={"x-api-key": demo_api_key()}) as resp:
                    assert resp.status == 200
                    assert _seen(await resp.json())["x-pake-peer-identity"] == GATEWAY_ID
                async with http.get(url + "/echo/hello") as resp:
                    assert resp.status == 401
                    assert resp.headers.getall("WWW-Authenticate")[0] == 'Bearer realm="pake"'
                async with http.get(url + "/echo/hello", headers=expired) as resp:
                    assert resp.status == 401
                    assert 'error_description="token expired"' in resp.headers["WWW-Authenticate"]
                async with http.post(url + "/echo/orders", headers=reader,
                                     json={"item": "tea", "qty": 0}) as resp:
                    assert resp.status == 400
                    assert (await resp.json())["detail"].startswith("$.qty: ")

                # echo's own sidecar enforces echo's policy for every caller, not only the gateway
                async with http.get(frontend.url() + "/echo/hello", headers={"Host": "echo"}) as resp:
                    assert resp.status == 200
                async with http.get(frontend.url() + "/echo/admin/stats",
                                    headers={"Host": "echo"}) as resp:
                    assert resp.status == 403
                    assert (await resp.json())["service"] == "echo"

    # echo's sidecar re-verified the forwarded token and decided by the gateway's identity
    decided = [(r["stage"], r["decision"], r["rule"], r["source"]) for r in echo.lines
               if isinstance(r, dict) and r.get("request_id") == admin_id and "stage" in r]
    assert decided == [("authn", "allow", "jwt:pake-issuer", GATEWAY_ID),
                       ("authz", "allow", "gateway", GATEWAY_ID)]
