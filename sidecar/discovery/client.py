"""The sidecar's control-plane client: one WebSocket over mTLS, kept open, failing over.

Per stream: connect (TCP + TLS with the held certificate + WebSocket upgrade, under
``connect_timeout``), check the server is ``pake-control``, send ``hello`` (node, service,
the inbound listener's reachable address, the version served), then answer what comes:

- ``snapshot``: validated by ``parse_mesh`` (the path a file takes, in a worker thread) and
  its bundle by certs; applied with ``Sidecar.apply``; kept on disk; then ``ack``. Refused:
  ``nack`` with the path-qualified problems ``pake-sidecar check`` prints, and the previous
  snapshot keeps serving.
- ``renew``: a new key (never reused) and a CSR; the key waits in ``next-key.pem``.
- ``certificate``: checked against that key and our identity, swapped into the TLS source in
  place (open connections keep theirs, new handshakes use it), kept on disk, acked.
- ``heartbeat``: the control plane's interval; ours carry the app's health, and each is
  followed by a ``stats`` message when there was traffic or a denial since the last one.

Losing the stream changes nothing in the data plane: the client reconnects with capped,
jittered exponential backoff, trying the next address each time. Nothing here blocks the
loop (keys, files and validation run in threads); every frame is bounded by
``MAX_MESSAGE_BYTES`` and every network phase by a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from certs import pem
from certs.bundle import TrustBundle
from certs.describe import uri_sans
from certs.identity import IdentityError, SpiffeId, workload_identity
from certs.issue import make_csr, new_key
from certs.memory_source import MemoryTlsSource, PemMaterial

from ..config.load import parse_mesh
from ..config.model import Address, ControlConfig, MeshConfig
from ..config.reader import ConfigError
from .origin import ConfigOrigin, now_iso
from .protocol import (
    CONTROL_SERVICE,
    MAX_MESSAGE_BYTES,
    Ack,
    Certificate,
    Csr,
    ErrorMessage,
    Heartbeat,
    Hello,
    Message,
    Nack,
    ProtocolError,
    Renew,
    Snapshot,
    Stats,
    decode,
    encode,
)
from .state import HeldSnapshot, StateDir

__all__ = ["ControlClient", "backoff_delay"]

log = structlog.get_logger("pake.discovery")

INITIAL_BACKOFF = 0.1
SEND_TIMEOUT = 10.0
DEFAULT_HEARTBEAT = 5.0


def backoff_delay(attempt: int, cap: float, rand: Callable[[], float] = random.random) -> float:
    """Full jitter: uniform in [0, min(cap, 0.1 s * 2^attempt)], at least 10 ms (pure).

    Jitter spreads a thousand sidecars that lost the same control plane over the window
    instead of having them all come back in the same instant."""
    ceiling = min(cap, INITIAL_BACKOFF * (2 ** min(attempt, 30)))
    return max(0.01, float(ceiling * rand()))


def _show(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class SidecarHooks:
    """What the client asks of the sidecar it serves (kept narrow: no import of ``app``)."""

    apply: Callable[[MeshConfig, ConfigOrigin], Awaitable[None]]  # raises ConfigError
    version: Callable[[], str | None]  # the snapshot version served, if it came from us
    app_healthy: Callable[[], bool]
    inbound: Callable[[], Address | None]  # the inbound listener's bound address
    identity_changed: Callable[[dict[str, Any]], None]  # a new certificate or bundle is in force
    stats: Callable[[], Stats | None] = lambda: None  # what was seen since the last call, if anything


class ControlClient:
    def __init__(self, config: ControlConfig, *, service: str, node: str, state: StateDir,
                 source: MemoryTlsSource, hooks: SidecarHooks) -> None:
        self.config = config
        self.service = service
        self.node = node
        self.state = state
        self.source = source
        self.hooks = hooks
        self.connected_to: str | None = None
        self.connected_since: str | None = None
        self.last_error: str | None = None
        self.reconnects = 0
        self._heartbeat = DEFAULT_HEARTBEAT
        self._pending_key: bytes | None = None
        self._next = 0  # index of the address to try next
        self._task: asyncio.Task[None] | None = None

    @property
    def trust_domain(self) -> str:
        return self.source.spiffe_id.trust_domain

    def info(self) -> dict[str, Any]:
        """For admin /config."""
        return {"addresses": [_show(a) for a in self.config.addresses], "node": self.node,
                "connected_to": self.connected_to, "connected_since": self.connected_since,
                "last_error": self.last_error, "reconnects": self.reconnects,
                "state_dir": str(self.state.path)}

    # === lifecycle ===

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name="control-client")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def run(self) -> None:
        """Forever: one stream at a time; between streams a jittered, capped backoff."""
        attempt = 0
        addresses = self.config.addresses
        while True:
            address = addresses[self._next % len(addresses)]
            established = False
            try:
                established = await self._stream(address)
                self.last_error = "the control plane closed the stream"
            except (OSError, TimeoutError, InvalidHandshake, InvalidURI, ConnectionClosed,
                    ProtocolError) as exc:
                self.last_error = f"{_show(address)}: {type(exc).__name__}: {exc}"
            except Exception as exc:  # a bug must not end the client: the data plane needs changes
                log.exception("control_client_error", address=_show(address))
                self.last_error = f"{_show(address)}: {type(exc).__name__}: {exc}"
            finally:
                if self.connected_to is not None:
                    log.warning("control_disconnected", address=self.connected_to, error=self.last_error)
                self.connected_to = self.connected_since = None
            if established:
                attempt = 0  # it worked: the next failure starts the backoff from the bottom
            else:
                self._next += 1  # fail over: the next attempt goes to the next address
            delay = backoff_delay(attempt, self.config.reconnect_max)
            attempt += 1
            self.reconnects += 1
            log.info("control_reconnecting", after_s=round(delay, 3), error=self.last_error,
                     next=_show(addresses[self._next % len(addresses)]))
            await asyncio.sleep(delay)

    # === one stream ===

    async def _stream(self, address: Address) -> bool:
        """One stream until it ends; True once the control plane answered the hello."""
        where = _show(address)
        c = self.config
        async with asyncio.timeout(c.connect_timeout):
            ws = await connect(f"wss://{where}/v1/stream", ssl=self.source.client(),
                               server_hostname=address[0], open_timeout=None,
                               max_size=MAX_MESSAGE_BYTES, max_queue=16, compression=None,
                               ping_interval=max(1.0, self._heartbeat), ping_timeout=max(2.0, 2 * self._heartbeat),
                               close_timeout=2.0, user_agent_header="pake-sidecar")
        try:
            self._check_server(ws, where)
            await self._send(ws, Hello(node=self.node, service=self.service,
                                       address=self._address(ws), version=self.hooks.version(),
                                       app_healthy=self.hooks.app_healthy()))
            async with asyncio.timeout(c.hello_timeout):
                first = await ws.recv()
            self.connected_to, self.connected_since = where, now_iso()
            self.last_error = None
            log.info("control_connected", address=where, node=self.node)
            beats = asyncio.create_task(self._heartbeats(ws))
            try:
                await self._answer(ws, decode(first), where)
                async for frame in ws:
                    try:
                        message = decode(frame)
                    except ProtocolError as exc:
                        log.warning("control_bad_message", address=where, error=str(exc))
                        continue
                    await self._answer(ws, message, where)
            finally:
                beats.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed, TimeoutError):
                    await beats
            return True
        finally:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await ws.close()

    def _check_server(self, ws: ClientConnection, where: str) -> None:
        """The bundle says the CA signed it; the SPIFFE ID says it is the control plane."""
        ssl_object = ws.transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        try:
            peer = workload_identity(der or b"", self.trust_domain, "server")
        except IdentityError as exc:
            raise ProtocolError(f"{where}: not the control plane: {exc}") from None
        if peer != SpiffeId(self.trust_domain, CONTROL_SERVICE):
            raise ProtocolError(f"{where}: the server is {peer}, not the control plane")

    def _address(self, ws: ClientConnection) -> str | None:
        """The inbound listener's address as peers reach it: its bound host, or, when it is
        bound to every interface, our address on the route to the control plane."""
        inbound = self.hooks.inbound()
        if inbound is None:
            return None
        host, port = inbound
        if host in ("0.0.0.0", "::", ""):
            local = ws.transport.get_extra_info("sockname")
            host = local[0] if local else "127.0.0.1"
        return _show((host, port))

    async def _send(self, ws: ClientConnection, message: Message) -> None:
        async with asyncio.timeout(SEND_TIMEOUT):
            await ws.send(encode(message))

    async def _heartbeats(self, ws: ClientConnection) -> None:
        while True:
            await asyncio.sleep(self._heartbeat)
            await self._send(ws, Heartbeat(app_healthy=self.hooks.app_healthy()))
            stats = self.hooks.stats()  # (a stats message lost with its stream loses its interval)
            if stats is not None:
                await self._send(ws, stats)

    async def _answer(self, ws: ClientConnection, message: Message, where: str) -> None:
        if isinstance(message, Snapshot):
            await self._send(ws, await self._on_snapshot(message, where))
        elif isinstance(message, Renew):
            await self._send(ws, await self._on_renew(message))
        elif isinstance(message, Certificate):
            await self._send(ws, await self._on_certificate(message))
        elif isinstance(message, Heartbeat):
            if message.interval is not None:
                self._heartbeat = message.interval
        elif isinstance(message, ErrorMessage):
            log.warning("control_error", address=where, code=message.code, detail=message.detail)
        else:
            log.warning("control_unexpected", address=where, type=message.TYPE)

    # === snapshots ===

    async def _on_snapshot(self, message: Snapshot, where: str) -> Ack | Nack:
        version = message.version
        try:
            mesh = await asyncio.to_thread(parse_mesh, message.mesh, source=f"snapshot {version}",
                                           version=version)
            if message.bundle is not None:
                await asyncio.to_thread(TrustBundle.from_pem, message.bundle.encode(), "snapshot.bundle")
            await self.hooks.apply(mesh, ConfigOrigin("control", where, now_iso()))
        except ConfigError as exc:
            return self._nack(version, "; ".join(exc.problems))
        except pem.PemError as exc:
            return self._nack(version, f"bundle: {exc.problem}")
        except Exception as exc:  # not the config's fault as far as we know, but it is not in force
            log.exception("snapshot_failed", version=version)
            return self._nack(version, f"the sidecar failed to apply it: {type(exc).__name__}: {exc}")
        if message.bundle is not None and message.bundle.encode() != self.source.held.bundle:
            await asyncio.to_thread(self.source.update_bundle, message.bundle.encode())
            await asyncio.to_thread(self.state.save_bundle, message.bundle.encode())
            self.hooks.identity_changed(self.source.info())
        held = HeldSnapshot(version=version, mesh=message.mesh, bundle=message.bundle,
                            origin=where, received_at=now_iso())
        await asyncio.to_thread(self.state.save_snapshot, held)
        log.info("snapshot_applied", version=version, origin=where)
        return Ack(version=version)

    def _nack(self, version: str, error: str) -> Nack:
        log.error("snapshot_rejected", version=version, error=error, keeping=self.hooks.version())
        return Nack(version=version, error=error)

    # === certificates ===

    async def _on_renew(self, message: Renew) -> Csr:
        key = await asyncio.to_thread(new_key)
        key_pem = pem.key_to_pem(key)
        csr = await asyncio.to_thread(make_csr, key, self.service, self.trust_domain)
        await asyncio.to_thread(self.state.save_next_key, key_pem)
        self._pending_key = key_pem
        log.info("certificate_renewing", reason=message.reason)
        return Csr(csr=csr.decode())

    async def _on_certificate(self, message: Certificate) -> Ack | Nack:
        key = self._pending_key
        if key is None:
            return Nack(version=message.version, kind="certificate", error="no CSR of ours is pending")
        held = PemMaterial(message.cert.encode(), key, message.bundle.encode())
        try:
            await asyncio.to_thread(self._check_identity, held.chain)
            await asyncio.to_thread(self.source.update, held)
        except pem.PemError as exc:
            log.error("certificate_rejected", version=message.version, error=str(exc))
            return Nack(version=message.version, kind="certificate", error=exc.problem)
        self._pending_key = None
        await asyncio.to_thread(self.state.save_identity, held)
        info = self.source.info()
        self.hooks.identity_changed(info)
        log.info("certificate_installed", version=message.version, serial=info["serial"],
                 not_after=info["not_after"])
        return Ack(version=message.version, kind="certificate")

    def _check_identity(self, chain: bytes) -> None:
        expected = str(SpiffeId(self.trust_domain, self.service))
        leaf = pem.parse_certificates(chain, self.state.files.cert)[0]
        uris = uri_sans(leaf)
        if uris != [expected]:
            raise pem.PemError(self.state.files.cert, f"certificate is for {uris}, this sidecar is {expected}")
