"""Joining the mesh with a token: fetch the bundle, check it, send a CSR, get a certificate.

The sidecar's first contact with a control plane it does not trust yet (kubeadm's discovery
token): the bundle is fetched over TLS *without* verification, then trusted only when a root
of it has the fingerprint the join token carries; ``POST /v1/join`` then goes over TLS
verified by that bundle, to a server that must prove it is ``pake-control``. The key is made
here (EC P-256) and never leaves; only the CSR does.

Stdlib + certs only (the sidecar never imports aiohttp): a minimal HTTP/1.1 client over
asyncio streams, one request per connection, with bounded heads and bodies and every phase
under a timeout. ``JoinRefused`` is the control plane's final word (a bad, used-up, expired or
revoked token): retrying cannot help. ``JoinFailed`` is anything worth another try elsewhere.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from dataclasses import dataclass
from typing import Any

from certs import pem
from certs.identity import IdentityError, SpiffeId, workload_identity
from certs.issue import make_csr, new_key
from certs.memory_source import PemMaterial

from ..config.model import Address
from .protocol import CONTROL_SERVICE, JoinToken

__all__ = ["JoinFailed", "JoinRefused", "Joined", "http_json", "join"]

MAX_HEAD = 16 * 1024
MAX_BODY = 1024 * 1024  # a certificate chain and a bundle of a few roots: a few KiB


class JoinFailed(Exception):
    """This attempt failed (unreachable, timed out, not our CA, garbled); try again."""


class JoinRefused(Exception):
    """The control plane refused the join; the token must be replaced."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class Joined:
    held: PemMaterial
    trust_domain: str
    address: str


def _show(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def http_json(address: Address, ctx: ssl.SSLContext, method: str, path: str,
                    body: dict[str, Any] | None, *, timeout: float
                    ) -> tuple[int, dict[str, Any], bytes | None]:
    """One HTTPS request with a JSON body -> (status, JSON object, server certificate DER).
    Every failure is JoinFailed naming the address and the phase."""
    where = f"{_show(address)}{path}"
    payload = b"" if body is None else json.dumps(body).encode()
    head = (f"{method} {path} HTTP/1.1\r\nHost: {_show(address)}\r\nConnection: close\r\n"
            f"Accept: application/json\r\nUser-Agent: pake-sidecar\r\n"
            f"Content-Length: {len(payload)}\r\n"
            + ("Content-Type: application/json\r\n" if body is not None else "") + "\r\n").encode()
    phase = "connect"
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                address[0], address[1], ssl=ctx, server_hostname=address[0],
                ssl_handshake_timeout=timeout, limit=MAX_HEAD)
            ssl_object = writer.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            phase = "request"
            writer.write(head + payload)
            await writer.drain()
            phase = "response"
            raw = await reader.readuntil(b"\r\n\r\n")
            status, length = _parse_head(raw)
            if length > MAX_BODY:
                raise JoinFailed(f"{where}: response body of {length} bytes exceeds {MAX_BODY}")
            data = await reader.readexactly(length)
    except TimeoutError:
        raise JoinFailed(f"{where}: no answer within {timeout}s ({phase})") from None
    except asyncio.LimitOverrunError:
        raise JoinFailed(f"{where}: response head exceeds {MAX_HEAD} bytes") from None
    except asyncio.IncompleteReadError:
        raise JoinFailed(f"{where}: connection closed mid-response") from None
    except ssl.SSLError as exc:
        raise JoinFailed(f"{where}: TLS {phase} failed: {exc.reason or exc}") from None
    except OSError as exc:
        raise JoinFailed(f"{where}: {phase} failed: {exc.strerror or exc}") from None
    finally:
        if writer is not None:
            writer.close()
    try:
        reply = json.loads(data)
    except ValueError:
        raise JoinFailed(f"{where}: HTTP {status} with a body that is not JSON") from None
    if not isinstance(reply, dict):
        raise JoinFailed(f"{where}: HTTP {status} with a JSON body that is not an object")
    return status, reply, der


def _parse_head(raw: bytes) -> tuple[int, int]:
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise JoinFailed(f"not an HTTP/1.1 response: {lines[0][:80]!r}")
    length: int | None = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length" and value.strip().isdigit():
            length = int(value.strip())
        elif name == "transfer-encoding":
            raise JoinFailed("chunked responses are not expected from the control plane")
    if length is None:
        raise JoinFailed("response without content-length")
    return int(parts[1]), length


def _unverified() -> ssl.SSLContext:
    """For the bundle fetch only: what it returns is trusted after the fingerprint check."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _verified(bundle: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # checked by SPIFFE ID instead: pake-control
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cadata=bundle)
    return ctx


def _string(reply: dict[str, Any], key: str, where: str) -> str:
    value = reply.get(key)
    if not isinstance(value, str) or not value:
        raise JoinFailed(f"{where}: reply without {key!r}")
    return value


async def join(address: Address, token: JoinToken, service: str, *, timeout: float) -> Joined:
    """One join attempt against one control-plane address (see the module docstring)."""
    where = _show(address)
    _, reply, _ = await http_json(address, _unverified(), "GET", "/v1/bundle", None, timeout=timeout)
    bundle = _string(reply, "bundle", where)
    trust_domain = _string(reply, "trust_domain", where)
    if not token.trusts(bundle):
        raise JoinFailed(f"{where}: its bundle does not hold the CA the join token names "
                         f"(fingerprint {token.ca_fingerprint[:16]}...): not our control plane")
    key = await asyncio.to_thread(new_key)
    csr = (await asyncio.to_thread(make_csr, key, service, trust_domain)).decode()
    status, reply, der = await http_json(
        address, _verified(bundle), "POST", "/v1/join",
        {"token": str(token), "service": service, "csr": csr}, timeout=timeout)
    try:
        peer = workload_identity(der or b"", trust_domain, "server")
    except IdentityError as exc:
        raise JoinFailed(f"{where}: the server is not the control plane: {exc}") from None
    if peer != SpiffeId(trust_domain, CONTROL_SERVICE):
        raise JoinFailed(f"{where}: the server is {peer}, not the control plane")
    if status in (400, 403):
        raise JoinRefused(status, str(reply.get("error", "refused")), str(reply.get("detail", "")))
    if status != 200:
        raise JoinFailed(f"{where}: join answered HTTP {status}: {reply.get('detail', '')}")
    chain = _string(reply, "certificate", where)
    new_bundle = _string(reply, "bundle", where)
    if not token.trusts(new_bundle):
        raise JoinFailed(f"{where}: the join reply's bundle does not hold the token's CA")
    return Joined(PemMaterial(chain.encode(), pem.key_to_pem(key), new_bundle.encode()),
                  trust_domain, where)
