"""The sidecar's mTLS glue: contexts from the bootstrap's files, who each peer is, rotation,
and the TLS metrics. Imported only when the bootstrap has ``tls`` (a feature that is not
configured is not imported: this pulls in ``cryptography``).

- Inbound: one *dispatcher* context for ``create_server(ssl=...)`` (uvloop's server-side
  ``start_tls`` hangs, uvloop#707); its SNI callback moves each handshake onto the current
  contexts, so a reload applies to the next handshake. ``peer_identity(transport)`` runs in
  ``connection_made``: a peer whose certificate is not a workload of our trust domain gets
  ``None`` and its connection is closed before any request is read.
- Outbound: per endpoint a context getter (client TLS session resumption, bounded) and an
  ``identify(transport)`` whose SPIFFE ID the router compares with the cluster's.
- Handshakes are counted by an ``ssl.SSLObject`` subclass (``SSLContext.sslobject_class``):
  the only place OpenSSL's reason for a refused handshake is visible, since uvloop drops the
  ``SSLError`` of a failed server-side handshake without a log line or a protocol callback.
- Never logs or shows key material: ``info()`` is the certificate's public facts.

Limits: a handshake that stops half-way (peer gone, ``ssl_handshake_timeout``) is not counted,
uvloop ends it outside ``do_handshake``. Server-side session tickets are sealed with the
dispatcher's keys, which live as long as the listener, so a client holding a ticket can
resume without showing its certificate again until the ticket expires (OpenSSL: 2 h), even
after a CA rotation; our own sidecars offer a session only from their current context.
"""

from __future__ import annotations

import re
import ssl
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from certs.identity import IdentityCache, IdentityError, SpiffeId
from certs.pem import PemError
from certs.rotation import FileWatcher
from certs.session_cache import ResumingContext, SessionCache
from certs.ssl_context import TlsContextSource

if TYPE_CHECKING:
    import asyncio

    from .config.model import Address, Bootstrap, MeshConfig

__all__ = ["SidecarTls", "handshake_failure_reason", "load_source"]

log = structlog.get_logger("pake.sidecar.tls")

Side = Literal["server", "client"]
ClientContext = ssl.SSLContext | ResumingContext

# Polling three stats costs microseconds; a replaced certificate is in use within this long.
WATCH_INTERVAL = 0.5
_MAX_PENDING_SESSIONS = 256  # upstream addresses whose last connection may hold a ticket

# OpenSSL X509_V_ERR_* codes of a refused peer chain -> our reason label. Everything a CA
# we do not trust can produce is "unknown_ca": to an operator it is one problem.
_VERIFY_REASONS = {
    2: "unknown_ca",  # unable to get issuer certificate
    9: "cert_not_yet_valid",
    10: "cert_expired",
    18: "unknown_ca",  # self-signed leaf
    19: "unknown_ca",  # self-signed certificate in chain
    20: "unknown_ca",  # unable to get local issuer certificate
    21: "unknown_ca",  # unable to verify the first certificate
    26: "bad_purpose",  # EKU without clientAuth (or serverAuth, client side)
}
_OPENSSL_REASON = re.compile(r"[A-Z0-9_]{1,64}")
_AGAIN = (ssl.SSLWantReadError, ssl.SSLWantWriteError, ssl.SSLSyscallError)  # as uvloop sees them


def handshake_failure_reason(exc: ssl.SSLError) -> str:
    """A short, bounded label for a failed handshake (OpenSSL's reasons are a fixed set)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _VERIFY_REASONS.get(exc.verify_code, "verify_failed")
    reason = exc.reason or ""
    if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return "no_peer_certificate"
    return reason.lower() if _OPENSSL_REASON.fullmatch(reason) else "tls_error"


def load_source(bootstrap: Bootstrap, mesh: MeshConfig) -> TlsContextSource:
    """Load the bootstrap's cert, key and bundle; PemError names the file and the problem.

    Also refuses a certificate for another identity than this sidecar's: every peer would
    refuse it later (503 ``UPE``), one request at a time, which is much harder to diagnose.
    """
    if bootstrap.tls is None:
        raise ValueError("the bootstrap has no tls files")
    source = TlsContextSource(bootstrap.tls)
    expected = SpiffeId(mesh.trust_domain, bootstrap.service)
    if source.spiffe_id != expected:
        raise PemError(bootstrap.tls.cert,
                       f"certificate is for {source.spiffe_id}, this sidecar is {expected}")
    return source


class TlsMetrics:
    """Prometheus metrics of the sidecar's TLS, in the sidecar's own registry."""

    def __init__(self, registry: CollectorRegistry, seconds_to_expiry: Callable[[], float]) -> None:
        self.expiry = Gauge("pake_tls_certificate_expiry_seconds",
                            "Seconds until the current workload certificate expires", registry=registry)
        self.expiry.set_function(seconds_to_expiry)
        self.handshakes = Counter("pake_tls_handshakes_total",
                                  "Completed TLS handshakes by side (server: inbound, client: upstream)"
                                  " and whether a session was resumed", ["side", "resumed"],
                                  registry=registry)
        self.failures = Counter("pake_tls_handshake_failures_total",
                                "Refused TLS handshakes and refused peer identities, by side and reason",
                                ["side", "reason"], registry=registry)
        self.reloads = Counter("pake_tls_reloads_total", "Certificate file reloads by result",
                               ["result"], registry=registry)


def _observed_sslobject(metrics: TlsMetrics, side: Side) -> type[ssl.SSLObject]:
    """An SSLObject class that counts its handshake's outcome; only ``do_handshake`` differs,
    so reads and writes of an established connection cost nothing extra."""
    fresh = metrics.handshakes.labels(side, "false")
    resumed = metrics.handshakes.labels(side, "true")
    failures = metrics.failures

    class ObservedSSLObject(ssl.SSLObject):
        def do_handshake(self) -> None:
            try:
                super().do_handshake()
            except _AGAIN:
                raise
            except ssl.SSLError as exc:
                failures.labels(side, handshake_failure_reason(exc)).inc()
                raise
            (resumed if self.session_reused else fresh).inc()

    return ObservedSSLObject


class SidecarTls:
    """The TLS state of one sidecar: the context source, identity rules, sessions, watcher."""

    def __init__(self, source: TlsContextSource, trust_domain: str, service: str,
                 registry: CollectorRegistry, *, watch_interval: float = WATCH_INTERVAL) -> None:
        self.source = source
        self.service = service
        self.identities = IdentityCache(trust_domain)
        self.sessions = SessionCache()
        self.metrics = TlsMetrics(registry, self.seconds_to_expiry)
        self._server_class = _observed_sslobject(self.metrics, "server")
        self._client_class = _observed_sslobject(self.metrics, "client")
        # The last connection per upstream address: its TLS 1.3 ticket arrives after the
        # handshake, so the session is collected when the pool opens the next connection.
        self._last_upstream: OrderedDict[Address, ssl.SSLObject] = OrderedDict()
        self.watcher = FileWatcher(source, self._reloaded, interval=watch_interval,
                                   on_error=self._reload_failed)

    # === contexts ========================================================================
    def server_context(self) -> ssl.SSLContext:
        """The one context of a TLS listener; it still rotates (see the module docstring)."""
        ctx = self.source.server_dispatcher()
        ctx.sslobject_class = self._server_class
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """The current client context, for connections that never resume (health checks)."""
        ctx = self.source.client()
        if ctx.sslobject_class is not self._client_class:  # a new context after a reload
            ctx.sslobject_class = self._client_class
        return ctx

    def context_for(self, address: Address) -> Callable[[], ClientContext]:
        """The context getter of one upstream endpoint's pool: offers that endpoint's last
        session when it was made with the current context (never across a reload)."""
        sessions, last = self.sessions, self._last_upstream

        def context() -> ClientContext:
            ctx = self.client_context()
            previous = last.pop(address, None)
            if previous is not None:
                sessions.store(address, previous.context, previous.session)
            return sessions.context_for(address, ctx)

        return context

    # === identities ======================================================================
    def use_trust_domain(self, trust_domain: str) -> None:
        """The mesh config names the trust domain; a new one gets a fresh identity cache."""
        if trust_domain != self.identities.trust_domain:
            self.identities = IdentityCache(trust_domain)

    def peer_identity(self, transport: asyncio.BaseTransport) -> str | None:
        """The SPIFFE ID of a downstream after its handshake, or None to refuse it."""
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if der is None:  # not reachable with CERT_REQUIRED; refuse rather than trust
            self.metrics.failures.labels("server", "no_peer_certificate").inc()
            log.warning("tls_peer_refused", client=_peer(transport), reason="no_peer_certificate")
            return None
        try:
            return str(self.identities.identify(der, "client"))
        except IdentityError as exc:
            self.metrics.failures.labels("server", exc.reason).inc()
            log.warning("tls_peer_refused", client=_peer(transport), reason=exc.reason, detail=str(exc))
            return None

    def identify_for(self, address: Address) -> Callable[[object], str | None]:
        """``identify(transport)`` for one upstream endpoint's pool: the SPIFFE ID the
        endpoint proved, or None (the router then answers 503 ``UPE``)."""
        last = self._last_upstream

        def identify(transport: object) -> str | None:
            ssl_object = transport.get_extra_info("ssl_object")  # type: ignore[attr-defined]
            if ssl_object is None:
                return None
            last[address] = ssl_object
            last.move_to_end(address)
            if len(last) > _MAX_PENDING_SESSIONS:
                last.popitem(last=False)
            der = ssl_object.getpeercert(binary_form=True)
            if der is None:
                return None
            try:
                return str(self.identities.identify(der, "server"))
            except IdentityError as exc:
                self.metrics.failures.labels("client", exc.reason).inc()
                log.warning("tls_upstream_refused", upstream=f"{address[0]}:{address[1]}",
                            reason=exc.reason, detail=str(exc))
                return None

        return identify

    # === rotation ========================================================================
    def start(self) -> None:
        """Watch the certificate files (static mode); the caller's loop runs the task."""
        self.watcher.start()

    async def stop(self) -> None:
        await self.watcher.stop()

    def _reloaded(self, info: dict[str, Any]) -> None:
        self.metrics.reloads.labels("ok").inc()
        log.info("tls_reloaded", spiffe_id=info["spiffe_id"], serial=info["serial"],
                 not_after=info["not_after"], bundle_roots=len(info["bundle"]))
        if info["spiffe_id"] != str(SpiffeId(self.identities.trust_domain, self.service)):
            # Not refused (the files are valid TLS material), but every peer will refuse it.
            log.error("tls_identity_mismatch", spiffe_id=info["spiffe_id"], service=self.service)

    def _reload_failed(self, exc: Exception) -> None:
        self.metrics.reloads.labels("failed").inc()
        # PemError is one line naming the file; keep serving with the current certificate.
        log.error("tls_reload_failed", error=str(exc), keeping=self.source.info()["serial"])

    # === facts ===========================================================================
    def seconds_to_expiry(self) -> float:
        return (self.source.material.leaf.not_valid_after_utc - datetime.now(UTC)).total_seconds()

    def info(self) -> dict[str, Any]:
        """For /config: subject, SPIFFE ID (the URI SAN), serial, validity, bundle roots and
        file paths; never the key."""
        info = self.source.info()
        info["watch"] = {"interval_s": self.watcher.interval, "reloads": self.watcher.reloads,
                         "last_error": str(self.watcher.last_error) if self.watcher.last_error else None}
        return info


def _peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if peer else "-"
