"""One sidecar's stream: a WebSocket over mTLS at /v1/stream, and what the control plane knows
about the sidecar behind it (held version, last NACK, app health, certificate expiry).

Rules: the client certificate decides who may speak; the hello's service must be the one the
certificate names. Each session has its own writer task and a bounded outbox: snapshots are
not queued, only the latest one waits (an older one is useless once a newer exists); a send
that takes longer than ``send_timeout`` or an outbox that overflows closes the stream, so a
stuck sidecar costs the others nothing. Certificates are renewed at 2/3 of their life by
asking the sidecar for a CSR (``renew``); the sidecar makes a new key each time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import WSMsgType, web
from cryptography import x509

from certs.ca import CLOCK_SKEW
from certs.identity import IdentityError
from control.ca_service import CAService, CsrRefused, peer_service
from control.registry import Registration, Registry
from control.store import StoreError
from control.snapshots import same_content
from sidecar.discovery.protocol import (
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
    Stats,
    decode,
    encode,
)

__all__ = ["SidecarSession", "StreamLimits", "StreamService"]

if TYPE_CHECKING:
    from control.push import Built

log = structlog.get_logger("pake.control.stream")

SessionKey = tuple[str, str]  # (service, node)


@dataclass(frozen=True, slots=True)
class StreamLimits:
    max_streams: int = 10_000
    hello_timeout: float = 10.0
    send_timeout: float = 10.0
    max_outbox: int = 64
    heartbeat_interval: float = 5.0
    min_csr_interval: float = 1.0


class SidecarSession:
    """A connected sidecar. State is read by status/check; the outbox is drained by one task."""

    def __init__(self, ws: web.WebSocketResponse, request: web.Request, hello: Hello,
                 cert: x509.Certificate, limits: StreamLimits) -> None:
        self.ws = ws
        self._request = request
        self.service = hello.service
        self.node = hello.node
        self.address = hello.address
        self.app_healthy = hello.app_healthy
        self.connected_since = datetime.now(UTC)
        self.limits = limits
        self.latest_version: str | None = None  # what it should hold
        self.sent_version: str | None = None
        self.acked_version: str | None = hello.version  # it serves this already (from disk)
        self.last_nack: dict[str, str] | None = None
        self.cert_not_before = cert.not_valid_before_utc
        self.cert_not_after = cert.not_valid_after_utc
        self.cert_pending: tuple[str, x509.Certificate, str | None] | None = None
        # The roots of the bundle it holds (known from its acks), and the root its
        # certificate chains to: what a CA rotation waits on, mesh-wide, via the registry.
        self.acked_roots: tuple[str, ...] = ()
        self.cert_root: str | None = None
        self._sent_roots: dict[str, tuple[str, ...]] = {}
        self.reregister = asyncio.Event()  # its registration must be written again
        self.renewal_asked_at = float("-inf")  # loop time of the last renewal asked for
        self.cert_changed = asyncio.Event()  # set when a new certificate was acked
        self.last_cert_error: str | None = None
        self.last_csr_at = 0.0
        self.closed_reason: str | None = None
        self._snapshot: tuple[str, str] | None = None
        self._outbox: deque[str] = deque()
        self._wake = asyncio.Event()

    @property
    def key(self) -> SessionKey:
        return (self.service, self.node)

    # === sending ===

    def offer_snapshot(self, built: Built) -> None:
        """Make ``built`` the one to send next; replaces a snapshot not yet sent. Nothing is
        sent when the sidecar holds (or is being sent) the same content under an older config
        version: a change elsewhere in the mesh is no change for this sidecar."""
        version = built.version
        holds = self.sent_version or self.acked_version
        if holds is not None and same_content(holds, version):
            self.latest_version = holds
            self._snapshot = None
            self._sent_roots[holds] = built.roots
            if holds == self.acked_version and self.acked_roots != built.roots:
                # It serves this content already (e.g. from disk): it holds these roots.
                self.acked_roots = built.roots
                self.reregister.set()
            return
        self.latest_version = version
        self._snapshot = (version, built.text)
        if len(self._sent_roots) >= 8:  # only recent versions can still be acked
            self._sent_roots.pop(next(iter(self._sent_roots)))
        self._sent_roots[version] = built.roots
        self._wake.set()

    def roots_of(self, version: str) -> tuple[str, ...] | None:
        """The roots of the bundle in a snapshot sent (or found held) under ``version``."""
        return self._sent_roots.get(version)

    def offer(self, message: Message) -> None:
        if len(self._outbox) >= self.limits.max_outbox:
            self.close(f"outbox full ({self.limits.max_outbox} messages): the sidecar cannot keep up")
            return
        self._outbox.append(encode(message))
        self._wake.set()

    async def run_writer(self) -> None:
        while self.closed_reason is None:
            await self._wake.wait()
            self._wake.clear()
            while self.closed_reason is None and (self._outbox or self._snapshot):
                if self._outbox:
                    text = self._outbox.popleft()
                else:
                    assert self._snapshot is not None
                    version, text = self._snapshot
                    self._snapshot = None
                    self.sent_version = version
                try:
                    async with asyncio.timeout(self.limits.send_timeout):
                        await self.ws.send_str(text)
                except TimeoutError:
                    self.close(f"a send took over {self.limits.send_timeout}s: the sidecar cannot keep up")
                    return
                except (ConnectionError, RuntimeError):
                    return  # closed under us; the reader ends the session

    def close(self, reason: str) -> None:
        """Close now without waiting on the peer (it may be the stuck one)."""
        if self.closed_reason is not None:
            return
        self.closed_reason = reason
        self._wake.set()
        log.warning("stream_closed", service=self.service, node=self.node, reason=reason)
        transport = self._request.transport
        if transport is not None:
            transport.abort()

    # === certificates ===

    @property
    def cert_issued_at(self) -> datetime:
        """When the certificate was issued: not_before is back-dated by the CA's CLOCK_SKEW,
        which must not count as life (a 1-minute certificate would be "2/3 old" at birth)."""
        return min(self.cert_not_before + CLOCK_SKEW, self.cert_not_after)

    def renew_delay(self, now: datetime) -> float:
        """Seconds until 2/3 of the current certificate's life."""
        life = self.cert_not_after - self.cert_issued_at
        return (self.cert_issued_at + life * 2 / 3 - now).total_seconds()

    def status(self) -> dict[str, Any]:
        if self.latest_version is None:
            state = "no config"
        elif self.acked_version == self.latest_version:
            state = "acked"
        elif self.last_nack is not None and self.last_nack["version"] == self.latest_version:
            state = "stale"
        else:
            state = "pending"
        return {
            "service": self.service, "node": self.node, "address": self.address,
            "connected": self.closed_reason is None,
            "held_version": self.acked_version, "latest_version": self.latest_version,
            "state": state, "last_nack": self.last_nack, "app_healthy": self.app_healthy,
            "cert_issued_at": self.cert_issued_at.isoformat(),
            "cert_expiry": self.cert_not_after.isoformat(),
            "last_cert_error": self.last_cert_error,
            "connected_since": self.connected_since.isoformat(timespec="seconds"),
        }


class StreamService:
    """Accepts streams, keeps the sessions, answers their messages."""

    def __init__(self, ca: CAService, registry: Registry, limits: StreamLimits,
                 on_session: Callable[[SidecarSession], None]) -> None:
        self.ca = ca
        self.registry = registry
        self.limits = limits
        self._on_session = on_session
        self.replica = ""  # this replica's listen address, recorded in its registrations
        self.sessions: dict[SessionKey, SidecarSession] = {}
        self._connecting = 0
        self._state_changed = asyncio.Event()
        # Where sidecars' stats messages go (control/observability.py); None: dropped.
        self.on_stats: Callable[[SidecarSession, Stats], None] | None = None

    async def wait_until(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Wait until ``predicate()`` holds; it is re-checked after every ack, nack or renewal."""
        async with asyncio.timeout(timeout):
            while not predicate():
                self._state_changed.clear()
                await self._state_changed.wait()

    def live(self) -> Mapping[SessionKey, SidecarSession]:
        return self.sessions

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if len(self.sessions) + self._connecting >= self.limits.max_streams:
            return web.json_response(
                {"error": "too_many_streams",
                 "detail": f"this control plane serves at most {self.limits.max_streams} streams; "
                           "try another replica or raise --max-streams"}, status=503)
        transport = request.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        try:
            spiffe = peer_service(der, self.ca.trust_domain)
        except IdentityError as exc:
            return web.json_response({"error": "mtls_required", "detail": str(exc)}, status=401)
        assert der is not None
        cert = x509.load_der_x509_certificate(der)
        # compress=False: permessage-deflate would keep ~290 KB of zlib state per stream and
        # compress every snapshot once per sidecar (in a thread, past 16 KiB) on each push.
        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE_BYTES, heartbeat=None, compress=False)
        self._connecting += 1
        try:
            await ws.prepare(request)
            hello = await self._hello(ws)
        finally:
            self._connecting -= 1
        if hello is None:
            return ws
        if hello.service != spiffe.service:
            await self._refuse(ws, "identity_mismatch",
                               f"the client certificate is for {spiffe}, it may not register as "
                               f"service {hello.service!r}")
            return ws
        session = SidecarSession(ws, request, hello, cert, self.limits)
        session.cert_root = self.ca.root_of(cert)
        await self._serve(session, hello)
        return ws

    async def _hello(self, ws: web.WebSocketResponse) -> Hello | None:
        try:
            async with asyncio.timeout(self.limits.hello_timeout):
                msg = await ws.receive()
        except TimeoutError:
            await self._refuse(ws, "no_hello", f"no hello within {self.limits.hello_timeout}s")
            return None
        if msg.type != WSMsgType.TEXT:
            await self._refuse(ws, "bad_message", "the first message must be a hello text frame")
            return None
        try:
            hello = decode(msg.data)
        except ProtocolError as exc:
            await self._refuse(ws, "bad_message", str(exc))
            return None
        if not isinstance(hello, Hello):
            await self._refuse(ws, "bad_message", f"the first message must be hello, got {hello.TYPE}")
            return None
        return hello

    async def _refuse(self, ws: web.WebSocketResponse, code: str, detail: str) -> None:
        log.warning("stream_refused", code=code, detail=detail)
        with contextlib.suppress(ConnectionError, RuntimeError, TimeoutError):
            async with asyncio.timeout(2):
                await ws.send_str(encode(ErrorMessage(code=code, detail=detail)))
                await ws.close(code=4403 if code == "identity_mismatch" else 4400,
                               message=code.encode())

    async def _serve(self, session: SidecarSession, hello: Hello) -> None:
        old = self.sessions.get(session.key)
        if old is not None:
            old.close("superseded by a new stream from the same node")
        self.sessions[session.key] = session
        log.info("stream_open", service=session.service, node=session.node,
                 address=session.address, held_version=hello.version)
        tasks = [asyncio.create_task(session.run_writer()),
                 asyncio.create_task(self._renewals(session)),
                 asyncio.create_task(self._reregistrations(session))]
        try:
            await self.registry.register(self._registration(session))
            session.offer(Heartbeat(interval=self.limits.heartbeat_interval))
            self._on_session(session)
            async for msg in session.ws:
                if msg.type != WSMsgType.TEXT:
                    break
                try:
                    message = decode(msg.data)
                except ProtocolError as exc:
                    session.offer(ErrorMessage(code="bad_message", detail=str(exc)))
                    continue
                await self._dispatch(session, message)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.sessions.get(session.key) is session:
                del self.sessions[session.key]
            session.close(session.closed_reason or "the sidecar closed the stream")

    def _registration(self, session: SidecarSession) -> Registration:
        # An endpoint is published only once its sidecar holds a config (acked, or held from
        # disk at hello): before that its inbound cannot serve, and callers would be sent there.
        address = session.address if session.acked_version is not None else None
        return Registration(service=session.service, node=session.node, address=address,
                            app_healthy=session.app_healthy,
                            registered_at=session.connected_since.isoformat(timespec="seconds"),
                            roots=session.acked_roots, cert_root=session.cert_root,
                            replica=self.replica)

    async def _dispatch(self, session: SidecarSession, message: Message) -> None:
        self._state_changed.set()
        if isinstance(message, Heartbeat):
            if message.app_healthy is not None and message.app_healthy != session.app_healthy:
                session.app_healthy = message.app_healthy
                await self.registry.register(self._registration(session))
            elif not self.registry.heard_from(session.service, session.node):
                await self.registry.register(self._registration(session))  # it had expired
        elif isinstance(message, Ack) and message.kind == "snapshot":
            first = session.acked_version is None  # it can serve from now on: publish it
            session.acked_version = message.version
            log.info("ack", service=session.service, node=session.node, version=message.version)
            roots = session.roots_of(message.version)
            if roots is not None and roots != session.acked_roots:
                session.acked_roots = roots
                await self.registry.register(self._registration(session))
            elif first:
                await self.registry.register(self._registration(session))
        elif isinstance(message, Nack) and message.kind == "snapshot":
            session.last_nack = {"version": message.version, "error": message.error,
                                 "at": datetime.now(UTC).isoformat(timespec="seconds")}
            log.warning("nack", service=session.service, node=session.node,
                        version=message.version, error=message.error)
        elif isinstance(message, Csr):
            self._sign(session, message)
        elif isinstance(message, Ack):
            if self._certificate_acked(session, message.version):
                await self.registry.register(self._registration(session))
        elif isinstance(message, Nack):
            session.last_cert_error = message.error
            log.warning("certificate_nack", service=session.service, node=session.node,
                        error=message.error)
        elif isinstance(message, Stats):
            if self.on_stats is not None:
                self.on_stats(session, message)
        else:
            session.offer(ErrorMessage(code="bad_message",
                                       detail=f"a sidecar does not send {message.TYPE}"))

    def _sign(self, session: SidecarSession, message: Csr) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() - session.last_csr_at < self.limits.min_csr_interval:
            session.offer(ErrorMessage(code="csr_too_soon",
                                       detail=f"at most one CSR per {self.limits.min_csr_interval}s"))
            return
        session.last_csr_at = loop.time()
        try:
            chain = self.ca.sign(message.csr.encode(), session.service)
        except CsrRefused as exc:
            session.offer(ErrorMessage(code="csr_refused", detail=str(exc)))
            return
        leaf = x509.load_pem_x509_certificate(chain.encode())
        version = f"cert.{leaf.serial_number:x}"
        session.cert_pending = (version, leaf, self.ca.root_of(leaf))
        session.offer(Certificate(version=version, cert=chain, bundle=self.ca.bundle_pem()))

    def _certificate_acked(self, session: SidecarSession, version: str) -> bool:
        """True when ``version`` was the pending certificate (now the session's)."""
        if session.cert_pending is None or session.cert_pending[0] != version:
            return False
        _, leaf, root = session.cert_pending
        session.cert_pending = None
        session.cert_root = root
        session.cert_not_before = leaf.not_valid_before_utc
        session.cert_not_after = leaf.not_valid_after_utc
        session.last_cert_error = None
        session.cert_changed.set()
        log.info("certificate_renewed", service=session.service, node=session.node,
                 not_after=session.cert_not_after.isoformat())
        return True

    async def _reregistrations(self, session: SidecarSession) -> None:
        """Write the registration again when the session's state changed outside a message."""
        while True:
            await session.reregister.wait()
            session.reregister.clear()
            try:
                await self.registry.register(self._registration(session))
            except StoreError as exc:
                log.warning("registration_failed", service=session.service, node=session.node,
                            error=str(exc))

    async def _renewals(self, session: SidecarSession) -> None:
        """Ask for a CSR at 2/3 of the certificate's life; ask again if nothing comes."""
        while True:
            delay = session.renew_delay(datetime.now(UTC))
            if delay <= 0:
                session.offer(Renew(reason="renewal"))
                life = (session.cert_not_after - session.cert_issued_at).total_seconds()
                delay = max(1.0, life / 30)  # retry well before expiry if no CSR comes
            session.cert_changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await session.cert_changed.wait()

    def request_renewal(self, session: SidecarSession, reason: str) -> asyncio.Event:
        """Ask for a CSR now (``certs rotate``); the event is set once the new certificate is acked."""
        session.renewal_asked_at = asyncio.get_running_loop().time()
        session.cert_changed.clear()
        session.last_csr_at = 0.0
        session.offer(Renew(reason=reason))
        return session.cert_changed
