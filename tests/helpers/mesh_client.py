"""A small client that behaves like a sidecar towards the control plane, for tests.

It does what the sidecar's client will: make a key and CSR locally, fetch the bundle and
check it against the join token's CA fingerprint before trusting it, join over TLS verified
by that bundle (checking the server is ``pake-control``), then open the stream over mTLS with
``websockets``, say hello, validate each snapshot with the sidecar's own ``parse_mesh`` and
ack or nack it, answer ``renew`` with a new key's CSR, ack certificates, send heartbeats.
Everything it receives is kept in ``received`` for assertions; ``wait_for`` waits on it.

Several control-plane addresses (a list for ``listen``) and ``failover=True``: when its stream
ends without ``close()``, it connects to the next address in turn (as the sidecar does), with
a short capped backoff, for at most ``reconnect_for`` seconds; ``stream_opens`` counts the
streams it opened, ``listen`` is the address it is on.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake, InvalidStatus

from certs import pem
from certs.identity import SpiffeId, workload_identity
from certs.issue import make_csr, new_key
from sidecar.config.load import parse_mesh
from sidecar.config.reader import ConfigError
from sidecar.discovery.protocol import (
    CONTROL_SERVICE,
    MAX_MESSAGE_BYTES,
    Ack,
    Certificate,
    Csr,
    ErrorMessage,
    Heartbeat,
    Hello,
    JoinToken,
    Message,
    Nack,
    Renew,
    Snapshot,
    decode,
    encode,
)

__all__ = ["JoinError", "MeshClient", "endpoints_of"]


class JoinError(Exception):
    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail


class MeshClient:
    def __init__(self, workdir: Path, listen: str | Sequence[str], *, service: str,
                 node: str = "node-1", address: str | None = "127.0.0.1:15006",
                 refuse: Callable[[Snapshot], str | None] | None = None,
                 answer_renew: bool = True, failover: bool = False,
                 reconnect_for: float = 10.0) -> None:
        self.dir = workdir / f"client-{service}-{node}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.addresses = [listen] if isinstance(listen, str) else list(listen)
        self.listen = self.addresses[0]
        self.failover = failover
        self.reconnect_for = reconnect_for
        self.stream_opens = 0
        self._closing = False
        self._hello: tuple[str | None, bool] = (None, True)
        self.service = service
        self.node = node
        self.address = address
        self.refuse = refuse  # a reason to NACK a snapshot that parse_mesh accepts
        self.answer_renew = answer_renew
        self.trust_domain = "pake.local"
        self.bundle: str | None = None
        self.held_version: str | None = None
        self.received: list[Message] = []
        self.ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._next_keys: dict[bytes, Any] = {}

    @property
    def cert_path(self) -> Path:
        return self.dir / "cert.pem"

    @property
    def key_path(self) -> Path:
        return self.dir / "key.pem"

    @property
    def bundle_path(self) -> Path:
        return self.dir / "bundle.pem"

    def certificate(self) -> x509.Certificate:
        return pem.load_certificates(self.cert_path)[0]

    # === join ===

    async def join(self, token_text: str, *, service: str | None = None,
                   csr_service: str | None = None) -> None:
        """Join with a token; JoinError carries the control plane's refusal."""
        token = JoinToken.parse(token_text)
        url = f"https://{self.listen}"
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/v1/bundle", ssl=insecure) as r:
                body = await r.json()
        if not token.trusts(body["bundle"]):
            raise JoinError(0, "wrong_ca", "the control plane's bundle does not hold the token's CA")
        self.trust_domain = body["trust_domain"]
        self.bundle = body["bundle"]
        self.bundle_path.write_text(self.bundle)
        verified = ssl.create_default_context(cadata=self.bundle)
        verified.check_hostname = False
        key = new_key()
        csr = make_csr(key, csr_service or self.service, self.trust_domain).decode()
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/v1/join", ssl=verified,
                                 json={"token": token_text, "service": service or self.service,
                                       "csr": csr}) as r:
                self._check_server(r)
                reply = await r.json()
                if r.status != 200:
                    raise JoinError(r.status, reply["error"], reply["detail"])
        pem.write_private_key(self.key_path, key)
        self.cert_path.write_text(reply["certificate"])

    def _check_server(self, response: aiohttp.ClientResponse) -> None:
        conn = response.connection
        transport = conn.transport if conn is not None else None
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        if ssl_object is not None:  # (a pooled connection was already checked)
            der = ssl_object.getpeercert(binary_form=True)
            peer = workload_identity(der, self.trust_domain, "server")
            assert peer == SpiffeId(self.trust_domain, CONTROL_SERVICE), peer

    # === stream ===

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.bundle_path))
        ctx.check_hostname = False
        ctx.load_cert_chain(self.cert_path, self.key_path)
        return ctx

    async def connect(self, *, hello_service: str | None = None, app_healthy: bool = True) -> None:
        """Open the stream and say hello (websockets raises InvalidStatus on an HTTP refusal)."""
        self._hello = (hello_service, app_healthy)
        self._closing = False
        await self._open(self.listen)
        self._reader = asyncio.create_task(self._run())

    async def _open(self, address: str) -> None:
        hello_service, app_healthy = self._hello
        self.ws = await connect(f"wss://{address}/v1/stream", ssl=self.client_context(),
                                max_size=MAX_MESSAGE_BYTES, ping_interval=None, open_timeout=5)
        self.listen = address
        self.stream_opens += 1
        await self.send(Hello(node=self.node, service=hello_service or self.service,
                              address=self.address, version=self.held_version,
                              app_healthy=app_healthy))

    async def _run(self) -> None:
        while True:
            await self._read()
            if self._closing or not self.failover or not await self._reconnect():
                return

    async def _reconnect(self) -> bool:
        """The next address that takes the stream, round robin from the one that failed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.reconnect_for
        start = self.addresses.index(self.listen) if self.listen in self.addresses else -1
        backoff, attempt = 0.02, 0
        while loop.time() < deadline and not self._closing:
            attempt += 1
            address = self.addresses[(start + attempt) % len(self.addresses)]
            try:
                await self._open(address)
                return True
            except (OSError, TimeoutError, InvalidStatus, InvalidHandshake):
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 0.5)
        return False

    async def send(self, message: Message) -> None:
        assert self.ws is not None
        await self.ws.send(encode(message))

    async def heartbeat(self, app_healthy: bool = True) -> None:
        await self.send(Heartbeat(app_healthy=app_healthy))

    async def _read(self) -> None:
        assert self.ws is not None
        with contextlib.suppress(Exception):
            async for frame in self.ws:
                message = decode(frame)
                self.received.append(message)
                await self._answer(message)
                self._changed.set()
        self._changed.set()

    async def _answer(self, message: Message) -> None:
        if isinstance(message, Snapshot):
            try:
                parse_mesh(message.mesh, source="snapshot", version=message.version)
                reason = self.refuse(message) if self.refuse else None
            except ConfigError as exc:
                reason = "; ".join(exc.problems)
            if reason is None:
                self.held_version = message.version
                if message.bundle is not None:  # trusted from now on, as the sidecar does
                    self.bundle = message.bundle
                    self.bundle_path.write_text(message.bundle)
                await self.send(Ack(version=message.version))
            else:
                await self.send(Nack(version=message.version, error=reason))
        elif isinstance(message, Renew) and self.answer_renew:
            key = new_key()
            # Several renewals may be in flight: the certificate says which key it is for.
            self._next_keys[_public_der(key.public_key())] = key
            await self.send(Csr(csr=make_csr(key, self.service, self.trust_domain).decode()))
        elif isinstance(message, Certificate):
            leaf = x509.load_pem_x509_certificate(message.cert.encode())
            key = self._next_keys.pop(_public_der(leaf.public_key()), None)
            if key is None:
                await self.send(Nack(version=message.version, error="no key for this certificate",
                                     kind="certificate"))
                return
            pem.write_private_key(self.key_path, key)
            self.cert_path.write_text(message.cert)
            self.bundle_path.write_text(message.bundle)
            await self.send(Ack(version=message.version, kind="certificate"))

    def of_type(self, kind: type[Any]) -> list[Any]:
        return [m for m in self.received if isinstance(m, kind)]

    @property
    def snapshots(self) -> list[Snapshot]:
        return self.of_type(Snapshot)

    @property
    def errors(self) -> list[ErrorMessage]:
        return self.of_type(ErrorMessage)

    @property
    def closed(self) -> bool:
        return self._reader is not None and self._reader.done()

    async def wait_for(self, predicate: Callable[[MeshClient], bool], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate(self):
                self._changed.clear()
                await self._changed.wait()

    async def wait_snapshot(self, where: Callable[[Snapshot], bool] = lambda s: True,
                            timeout: float = 5.0) -> Snapshot:
        await self.wait_for(lambda c: any(where(s) for s in c.snapshots), timeout)
        return [s for s in self.snapshots if where(s)][-1]

    async def close(self) -> None:
        self._closing = True
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


def endpoints_of(snapshot: Snapshot, service: str) -> list[str]:
    return list((snapshot.mesh.get("services") or {}).get(service, {}).get("endpoints") or [])


def _public_der(public_key: Any) -> bytes:
    return bytes(public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))
