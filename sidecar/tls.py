"""The sidecar's mTLS glue: contexts from the bootstrap's files, who each peer is, rotation,
and the TLS metrics; and the gateway listener's server-only TLS for outside clients. Imported
only when the bootstrap has ``tls`` or a listener has a server certificate (a feature that is
not configured is not imported: this pulls in ``cryptography``).

- Inbound: one *dispatcher* context for every handshake of a TLS listener
  (``upstream.tls_protocol``); its SNI callback moves each handshake onto the current
  contexts, so a reload applies to the next handshake. ``peer_identity(transport)`` runs in
  ``connection_made``: a peer whose certificate is not a workload of our trust domain gets
  ``None`` and its connection is closed before any request is read.
- Outbound: per endpoint a context getter (client TLS session resumption, bounded) and an
  ``identify(transport)`` whose SPIFFE ID the router compares with the cluster's.
- Handshakes are counted by an ``ssl.SSLObject`` subclass (``SSLContext.sslobject_class``),
  for the listeners' and the pool's TLS (``upstream.tls_protocol``) and for health checks
  (uvloop's TLS) alike: the one place that sees OpenSSL's reason for every refusal.
- Gateway (``ServerTls``): a server certificate for outside clients, no client certificate
  asked; the same dispatcher and file-watching scheme as the mesh certificate.
- Never logs or shows key material: ``info()`` is the certificate's public facts.

Resumption: server-side session tickets are sealed with the dispatcher's keys, which live as
long as the listener (OpenSSL decides on a ticket before the SNI callback switches contexts),
and a resumed handshake shows no certificate. So ``peer_identity`` verifies the certificate of
every resumed session again, against the current bundle and clock, before a request is read:
a peer that a full handshake would refuse now (its root removed, its certificate expired) is
refused as ``resumed_<reason>``; one still trusted (a rotation's overlap) resumes as before.

Limits: a handshake that stops half-way (the peer gone, ``timeouts.tls_handshake``) is not
counted: it ends outside ``do_handshake``, having refused nothing.
"""

from __future__ import annotations

import hashlib
import re
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import structlog

from certs import pem
from certs.describe import describe_certificate
from certs.identity import IdentityCache, IdentityError, SpiffeId
from certs.pem import PemError
from certs.rotation import FileWatcher
from certs.session_cache import ResumingContext, SessionCache
from certs.ssl_context import ALPN_PROTOCOLS, TlsContextSource, resumed_peer_refusal

from .observability.exposition import CollectorRegistry, Counter, Gauge

if TYPE_CHECKING:
    import asyncio

    from cryptography import x509

    from .config.model import Address, Bootstrap, MeshConfig, ServerTlsFiles

__all__ = ["ServerTls", "SidecarTls", "handshake_failure_reason", "load_source"]

log = structlog.get_logger("pake.tls")

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


EXPIRY_ALARM = 1 / 6  # of a certificate's life left: pake_tls_certificate_expiring from here
SESSION_REPLACE_INTERVAL = 10.0  # seconds between replacing an endpoint's cached TLS session


class TlsMetrics:
    """Prometheus metrics of the sidecar's TLS, in the sidecar's own registry."""

    def __init__(self, registry: CollectorRegistry, seconds_to_expiry: Callable[[], float],
                 alarm_seconds: Callable[[], float]) -> None:
        self.expiry = Gauge("pake_tls_certificate_expiry_seconds",
                            "Seconds until the current workload certificate expires", registry=registry)
        self.expiry.set_function(seconds_to_expiry)
        # An alert needs no per-deployment threshold: the sidecar exports its own, and a 0/1
        # that is 1 from the threshold on (and after the expiry, when the mesh refuses it).
        self.alarm = Gauge("pake_tls_certificate_expiry_alarm_seconds",
                           "Below this many seconds to expiry the certificate is overdue for renewal",
                           registry=registry)
        self.alarm.set_function(alarm_seconds)
        self.expiring = Gauge("pake_tls_certificate_expiring",
                              "1 when the certificate's time to expiry is below the alarm threshold",
                              registry=registry)
        self.expiring.set_function(lambda: float(seconds_to_expiry() < alarm_seconds()))
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
    """An SSLObject class that counts its handshake's outcome. Its ``read``, ``write`` and
    ``pending`` are the C object's own: uvloop calls them for every TLS record, and
    ``ssl.SSLObject``'s are Python wrappers around them (an interpreted frame each; binding
    them saved 3.4k of 58.7k instructions per round trip of a bare uvloop TLS echo). uvloop
    always passes ``read`` a size, which the C method requires."""
    fresh = metrics.handshakes.labels(side, "false")
    resumed = metrics.handshakes.labels(side, "true")
    failures = metrics.failures

    class ObservedSSLObject(ssl.SSLObject):
        @classmethod
        def _create(cls, *args: Any, **kwargs: Any) -> Any:  # what SSLContext.wrap_bio calls
            obj = super()._create(*args, **kwargs)  # type: ignore[misc]  # not in typeshed
            inner = obj._sslobj  # the _ssl._SSLSocket it wraps
            obj.read, obj.write, obj.pending = inner.read, inner.write, inner.pending
            return obj

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
                 registry: CollectorRegistry, *, watch_interval: float = WATCH_INTERVAL,
                 resume_upstream_sessions: bool = False, watch: bool = True) -> None:
        self.source = source
        # Static mode watches the files; a joined sidecar's control client updates the
        # source in place (certs.memory_source) and reports through identity_changed.
        self.watch = watch
        self.resume_upstream_sessions = resume_upstream_sessions
        self.service = service
        self.identities = IdentityCache(trust_domain)
        self.sessions = SessionCache()
        self.metrics = TlsMetrics(registry, self.seconds_to_expiry, self.expiry_alarm_seconds)
        self._server_class = _observed_sslobject(self.metrics, "server")
        self._client_class = _observed_sslobject(self.metrics, "client")
        # The last connection per upstream address: its TLS 1.3 ticket arrives after the
        # handshake, so the session is collected when the pool opens the next connection.
        self._last_upstream: OrderedDict[Address, ssl.SSLObject] = OrderedDict()
        self._stored_at: dict[Address, float] = {}  # when each endpoint's session was last replaced
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
        if not self.resume_upstream_sessions:
            return self.client_context  # see TlsFiles.resume_upstream_sessions
        sessions, last, stored = self.sessions, self._last_upstream, self._stored_at

        def context() -> ClientContext:
            ctx = self.client_context()
            previous = last.pop(address, None)
            if previous is not None and not previous.session_reused:
                # Offering a fresh session on every connection grows native memory by
                # ~2.5-6.6 KB a connection without bound (CPython ssl + OpenSSL 3, on uvloop and
                # asyncio alike), whether or not the server resumes it. So the cached session
                # is kept while it resumes, and when one was offered and refused it is replaced
                # at most every SESSION_REPLACE_INTERVAL (a server that never resumes then
                # costs little); with none offered (first, or after a reload) it is stored.
                now = time.monotonic()
                refused = sessions.holds(address, previous.context)  # offered, not resumed
                if not refused or now - stored.get(address, -SESSION_REPLACE_INTERVAL) >= SESSION_REPLACE_INTERVAL:
                    stored[address] = now
                    if len(stored) > _MAX_PENDING_SESSIONS:
                        stored.pop(next(iter(stored)))
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
        if ssl_object.session_reused:
            # no certificate was checked: would a full handshake let this peer in now?
            refusal = resumed_peer_refusal(der, self.source.material, datetime.now(UTC))
            if refusal is not None:
                self.metrics.failures.labels("server", f"resumed_{refusal}").inc()
                log.warning("tls_peer_refused", client=_peer(transport), reason=f"resumed_{refusal}")
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
            if self.resume_upstream_sessions:
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
        if self.watch:
            self.watcher.start()

    def identity_changed(self, info: dict[str, Any]) -> None:
        """The source was updated in place (a renewal or a new bundle): count and log it
        like a file reload."""
        self._reloaded(info)

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

    def expiry_alarm_seconds(self) -> float:
        """``EXPIRY_ALARM`` of the certificate's life: renewal is due with a third of it left,
        so a certificate with a sixth left has missed half its renewal window."""
        leaf = self.source.material.leaf
        return (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds() * EXPIRY_ALARM

    def info(self) -> dict[str, Any]:
        """For /config: subject, SPIFFE ID (the URI SAN), serial, validity, bundle roots and
        file paths; never the key."""
        info = self.source.info()
        if self.watch:
            info["watch"] = {"interval_s": self.watcher.interval, "reloads": self.watcher.reloads,
                             "last_error": str(self.watcher.last_error) if self.watcher.last_error else None}
        else:
            info["source"] = "control plane"
        return info


def _peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if peer else "-"


# === the gateway's server certificate ====================================================


@dataclass(frozen=True, slots=True)
class _ServerPaths:
    """The files ``FileWatcher`` stamps. It watches a (cert, key, bundle) triple; a
    server-only certificate has no bundle, so the certificate stands in for it."""

    cert: Path
    key: Path

    @property
    def bundle(self) -> Path:
        return self.cert


@dataclass(frozen=True)
class _ServerGeneration:
    context: ssl.SSLContext
    leaf: x509.Certificate
    digest: bytes  # of both files' bytes: a reload of the same content is a no-op


def _server_generation(files: _ServerPaths, now: datetime) -> _ServerGeneration:
    """Validate the pair with certs.pem (PemError names the bad file), then build a
    server-only context: TLS >= 1.2, no client certificate, ALPN http/1.1, tickets on."""
    cert_bytes, key_bytes = pem.read_file(files.cert), pem.read_file(files.key)
    chain = pem.parse_certificates(cert_bytes, files.cert)
    key = pem.parse_private_key(key_bytes, files.key)
    pem.check_key_matches(chain[0], key, files.cert, files.key)
    pem.check_validity(chain[0], files.cert, now)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_NONE  # outside callers authenticate with a JWT or an API key
    ctx.options &= ~ssl.OP_NO_TICKET  # resumption saves a reconnecting client a full handshake
    ctx.set_alpn_protocols(list(ALPN_PROTOCOLS))
    try:
        ctx.load_cert_chain(files.cert, files.key)
    except ssl.SSLError as exc:  # only if a file changed between validation and this load
        raise PemError(files.cert, f"OpenSSL refused the certificate/key pair: {exc.reason or exc}") from None
    except OSError as exc:
        raise PemError(files.cert, f"cannot read for TLS: {exc.strerror or exc}") from None
    digest = hashlib.sha256(hashlib.sha256(cert_bytes).digest() + hashlib.sha256(key_bytes).digest())
    return _ServerGeneration(ctx, chain[0], digest.digest())


class ServerTls:
    """Server-only TLS of the gateway listener, for outside clients.

    Like the mesh certificate: one dispatcher context for ``create_server(ssl=...)`` whose SNI
    callback moves each handshake onto the current context, and a ``FileWatcher`` that
    reloads it when the files change (a failed reload is logged and the current certificate
    keeps serving). Construction loads the files and raises PemError if they are unusable.
    """

    def __init__(self, files: ServerTlsFiles, *, watch_interval: float = WATCH_INTERVAL) -> None:
        self.files = _ServerPaths(files.cert, files.key)
        self._current = _server_generation(self.files, datetime.now(UTC))
        # Its own settings are those of every generation; only its SNI callback differs.
        self._dispatcher = _server_generation(self.files, datetime.now(UTC)).context
        self._dispatcher.sni_callback = self._select
        # FileWatcher asks its source for .files, .reload() and .info(): this class has them.
        self.watcher = FileWatcher(cast(TlsContextSource, self), self._reloaded,
                                   interval=watch_interval, on_error=self._reload_failed)

    def server_context(self) -> ssl.SSLContext:
        """The one context of the listener; it still rotates (see the class docstring)."""
        return self._dispatcher

    def _select(self, ssl_object: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                _: object) -> None:
        ssl_object.context = self._current.context

    def reload(self) -> bool:
        """Re-read the files; True when a new context was swapped in (PemError: kept the old)."""
        generation = _server_generation(self.files, datetime.now(UTC))
        if generation.digest == self._current.digest:
            return False
        self._current = generation  # one assignment: the next handshake uses it
        return True

    def start(self) -> None:
        self.watcher.start()

    async def stop(self) -> None:
        await self.watcher.stop()

    def _reloaded(self, info: dict[str, Any]) -> None:
        log.info("gateway_tls_reloaded", subject=info["subject"], serial=info["serial"],
                 not_after=info["not_after"])

    def _reload_failed(self, exc: Exception) -> None:
        log.error("gateway_tls_reload_failed", error=str(exc), keeping=self.info()["serial"])

    def info(self) -> dict[str, Any]:
        """The current certificate's public facts and its files; never the key."""
        info = describe_certificate(self._current.leaf, datetime.now(UTC))
        info["files"] = {"cert": str(self.files.cert), "key": str(self.files.key)}
        return info
