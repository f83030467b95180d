"""TLS contexts for mesh mTLS, and a source that swaps them on rotation.

Rules: both sides require a certificate from the peer and verify it against
the trust bundle; the peer's *identity* is then checked by SPIFFE ID
(certs.identity), never by host name. Files are validated with certs.pem
before OpenSSL sees them, so an error names the file and the problem.
A TlsContextSource builds new contexts and swaps them in with one
assignment: handshakes started later use the new ones, connections already
open keep theirs.
"""

from __future__ import annotations

import hashlib
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from certs import pem
from certs.bundle import TrustBundle
from certs.chain_building import stop_chain_building
from certs.describe import describe_certificate, fingerprint, uri_sans
from certs.identity import IdentityError, SpiffeId

__all__ = [
    "ALPN_PROTOCOLS",
    "TlsContextSource",
    "TlsFiles",
    "TlsMaterial",
    "TlsPaths",
    "client_context",
    "describe",
    "load_material",
    "resumed_peer_refusal",
    "server_context",
]

ALPN_PROTOCOLS = ("http/1.1",)
# Wall time as an aware datetime, for certificate validity; not sidecar.clock.Clock (the one
# Clock protocol, monotonic), which certs cannot import.
UtcNow = Callable[[], datetime]
Side = Literal["server", "client"]


def _utcnow() -> datetime:
    return datetime.now(UTC)


class TlsPaths(Protocol):
    """Anything naming the three files, e.g. TlsFiles or the sidecar config's own."""

    @property
    def cert(self) -> Path: ...

    @property
    def key(self) -> Path: ...

    @property
    def bundle(self) -> Path: ...


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Paths of a workload's certificate chain, private key and trust bundle."""

    cert: Path
    key: Path
    bundle: Path

    @classmethod
    def of(cls, cert: Path | str, key: Path | str, bundle: Path | str) -> TlsFiles:
        return cls(Path(cert), Path(key), Path(bundle))


@dataclass(frozen=True)
class TlsMaterial:
    """The validated content of a TlsFiles: what the contexts were built from.

    `digest` covers the bytes of all three files, so a reload can tell
    "nothing changed" from "changed" without comparing certificates.
    """

    files: TlsPaths
    chain: tuple[x509.Certificate, ...]
    bundle: TrustBundle
    spiffe_id: SpiffeId
    digest: bytes

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]


def load_material(files: TlsPaths, now: datetime | None = None) -> TlsMaterial:
    """Read and validate cert, key and bundle; PemError names the bad file.

    Checks: each file exists and parses, the key matches the leaf, the
    leaf is within its validity period at `now` and carries exactly one
    URI SAN that is a SPIFFE ID (our own identity; every peer checks it).
    """
    now = _utcnow() if now is None else now
    cert_bytes = pem.read_file(files.cert)
    key_bytes = pem.read_file(files.key)
    bundle_bytes = pem.read_file(files.bundle)
    chain = pem.parse_certificates(cert_bytes, files.cert)
    key = pem.parse_private_key(key_bytes, files.key)
    pem.check_key_matches(chain[0], key, files.cert, files.key)
    pem.check_validity(chain[0], files.cert, now)
    spiffe_id = _own_identity(chain[0], files.cert)
    bundle = TrustBundle.from_pem(bundle_bytes, files.bundle)
    digest = hashlib.sha256(
        b"\0".join(hashlib.sha256(b).digest() for b in (cert_bytes, key_bytes, bundle_bytes))
    ).digest()
    return TlsMaterial(files, tuple(chain), bundle, spiffe_id, digest)


def _own_identity(leaf: x509.Certificate, source: Path) -> SpiffeId:
    uris = uri_sans(leaf)
    if len(uris) != 1:
        raise pem.PemError(
            source, f"certificate must carry exactly one SPIFFE ID URI SAN, found {len(uris)}"
        )
    try:
        return SpiffeId.parse(uris[0])
    except IdentityError as exc:
        raise pem.PemError(
            source, f"certificate URI SAN is not a workload SPIFFE ID: {exc}"
        ) from None


def _build(side: Side, material: TlsMaterial) -> ssl.SSLContext:
    ctx = _configure(side, material)
    files = material.files
    try:
        load_identity(ctx, material, files.key)
    except ssl.SSLError as exc:
        # Only reachable if the key file changed between validation and this load.
        raise pem.PemError(
            files.cert, f"OpenSSL refused the certificate/key pair: {exc.reason or exc}"
        ) from None
    except OSError as exc:
        raise pem.PemError(files.key, f"cannot read for TLS: {exc.strerror or exc}") from None
    return ctx


# A chain longer than this is not completed further (a loop of cross-signed CAs ends here).
MAX_PRESENTED_CHAIN = 8


def presented_chain(material: TlsMaterial, *, root: bool = True) -> tuple[x509.Certificate, ...]:
    """The chain a context loads: a leaf alone completed with its issuers from the bundle, up
    to a self-issued root (without it when ``root`` is false); a chain that came with
    intermediates as given.

    Why: given a leaf alone, OpenSSL would build that same chain from the trust store on
    every handshake (``X509_verify_cert``, with a signature check) and send it, root
    included. Loaded, the building is gone (1.8M of 19.4M instructions per mesh connection);
    where ``stop_chain_building`` holds, the root is left out as well, since the peer holds it
    (3.2M more), while intermediates the bundle holds are still sent, as OpenSSL sent them.
    """
    chain = list(material.chain)
    if len(chain) != 1:
        return material.chain
    candidates = [ca for ca in material.bundle.roots if root or ca.issuer != ca.subject]
    while len(chain) < MAX_PRESENTED_CHAIN and chain[-1].issuer != chain[-1].subject:
        issuer = next((ca for ca in candidates
                       if ca not in chain and _directly_issued(chain[-1], ca)), None)
        if issuer is None:  # none (left) in the bundle: the peer's own bundle completes it
            break
        chain.append(issuer)
    return tuple(chain)


def _directly_issued(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def load_identity(ctx: ssl.SSLContext, material: TlsMaterial, key: Path | bytes) -> None:
    """Load our certificate chain (``presented_chain``) and key into ``ctx``: without the root
    where OpenSSL can be told to send only what it was given (``certs.chain_building``).

    key: the key file's path, or the key's PEM. OpenSSL reads a chain only from a file: the
    certificates (and a key given as PEM) go to an anonymous memory file (Linux, /proc
    mounted), or else to a private temporary directory (0700, file 0600) for the moment of
    the load. Blocking: a context build. Raises ssl.SSLError if OpenSSL refuses the pair,
    OSError if the key file cannot be read.
    """
    chain = presented_chain(material, root=not stop_chain_building(ctx))
    data = pem.certificates_to_pem(chain)
    if isinstance(key, bytes):
        data = data.rstrip(b"\n") + b"\n" + key
    keyfile = key if isinstance(key, Path) else None
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        # Never on a file system, and no ``tempfile``, whose ``shutil`` brings zlib, bz2 and
        # lzma into the sidecar (0.55 MB of its memory).
        with os.fdopen(os.memfd_create("pake-tls-identity", os.MFD_CLOEXEC), "wb") as f:
            f.write(data)
            f.flush()
            ctx.load_cert_chain(f"/proc/self/fd/{f.fileno()}", keyfile)
        return
    import tempfile  # noqa: PLC0415 - only where there is no memfd_create

    with tempfile.TemporaryDirectory(prefix="pake-tls-") as tmp:
        path = Path(tmp) / "identity.pem"
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(data)
        ctx.load_cert_chain(path, keyfile)


def _configure(side: Side, material: TlsMaterial) -> ssl.SSLContext:
    """Every setting of a mesh context but its own certificate (the caller loads that)."""
    if side == "server":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        # Resumption (tickets for TLS 1.3 and 1.2) saves a full handshake per
        # reconnecting peer; tickets are keyed per context, so a rotation
        # (new context) also ends resumption of sessions made before it.
        ctx.options &= ~ssl.OP_NO_TICKET
        # One TLS 1.3 ticket per handshake, not OpenSSL's two: a resuming sidecar keeps one
        # session per endpoint, and each ticket costs both sides ~1.9M instructions (callgrind,
        # a uvloop mTLS handshake with P-256 certificates: 21.3M with two, 19.4M with one). The
        # gateway's context for outside clients keeps two (browsers open connections in parallel).
        ctx.num_tickets = 1
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        # The peer is identified by its SPIFFE ID after the handshake, not by
        # a host name: endpoints are addresses, and many share one identity.
        ctx.check_hostname = False
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    # Our own CA writes RFC 5280-clean certificates, so let OpenSSL insist.
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.set_alpn_protocols(list(ALPN_PROTOCOLS))
    # The bundle from the bytes already validated, not re-read from disk.
    ctx.load_verify_locations(cadata=material.bundle.to_pem().decode("ascii"))
    return ctx


def server_context(
    cert: Path | str, key: Path | str, bundle: Path | str, *, now: datetime | None = None
) -> ssl.SSLContext:
    """A server context requiring a client certificate from the bundle's CAs."""
    return _build("server", load_material(TlsFiles.of(cert, key, bundle), now))


def client_context(
    cert: Path | str, key: Path | str, bundle: Path | str, *, now: datetime | None = None
) -> ssl.SSLContext:
    """A client context presenting our certificate, verifying the server's chain.

    Pass `server_hostname=""` (asyncio) or a service name for SNI; host
    names are not checked. Check the server with workload_identity(role="server").
    """
    return _build("client", load_material(TlsFiles.of(cert, key, bundle), now))


@dataclass(frozen=True)
class _Generation:
    """One consistent set: both contexts and the material they came from."""

    material: TlsMaterial
    server: ssl.SSLContext
    client: ssl.SSLContext


class TlsContextSource:
    """The current server and client contexts of a workload, reloadable.

    The sidecar asks `.server()` for each accepted connection and `.client()`
    for each new upstream connection, so a reload takes effect at the next
    handshake while open connections keep the context they started with.
    Construction loads the files and raises PemError if they are unusable.
    """

    def __init__(self, files: TlsPaths, *, clock: UtcNow = _utcnow) -> None:
        self.files = files
        self._clock = clock
        self._current = self._load()

    def _load(self) -> _Generation:
        return self._build(load_material(self.files, self._clock()))

    @staticmethod
    def _build(material: TlsMaterial) -> _Generation:
        return _Generation(material, _build("server", material), _build("client", material))

    def server(self) -> ssl.SSLContext:
        """The server context for the next accepted connection."""
        return self._current.server

    def client(self) -> ssl.SSLContext:
        """The client context for the next upstream connection."""
        return self._current.client

    def server_dispatcher(self) -> ssl.SSLContext:
        """One fixed context for `create_server(ssl=...)` that still rotates.

        For listeners that let the loop do TLS instead of calling start_tls
        per connection: its SNI callback (OpenSSL calls it for every
        ClientHello, with or without a server name) moves each new handshake
        onto the current server context, so certificate, key and bundle of
        the latest reload apply. Its own settings (CERT_REQUIRED, TLS >= 1.2,
        strict verification) are those of every server context.
        Caveat: session tickets are issued under the dispatcher's keys (OpenSSL
        decides on resumption before the SNI callback runs), so a session may
        resume across a reload until the ticket expires (OpenSSL: 2 h), and a
        resumed handshake checks no certificate: the server must check the
        resumed peer itself with ``resumed_peer_refusal``.
        """
        ctx = _build("server", self._current.material)
        ctx.sni_callback = self._select_server
        return ctx

    def _select_server(
        self, ssl_object: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: object
    ) -> None:
        ssl_object.context = self._current.server

    @property
    def spiffe_id(self) -> SpiffeId:
        """Our own identity, from the current certificate."""
        return self._current.material.spiffe_id

    @property
    def material(self) -> TlsMaterial:
        """What the current contexts were built from."""
        return self._current.material

    def reload(self) -> bool:
        """Re-read the files; swap in new contexts if their content changed.

        Returns True when new contexts were swapped in, False when the files
        hold exactly what is already loaded. Raises PemError when the files
        are unusable (missing, corrupt, key/cert mismatch mid-rotation,
        expired); the current contexts then stay in place.
        """
        material = load_material(self.files, self._clock())
        if material.digest == self._current.material.digest:
            return False
        # One assignment: a reader gets the old or the new pair, never a mix.
        self._current = self._build(material)
        return True

    def info(self) -> dict[str, Any]:
        """The current certificate for /certs, logs and `certs show`; never the key."""
        return describe(self._current.material, self._clock())


def resumed_peer_refusal(der: bytes, material: TlsMaterial, now: datetime) -> str | None:
    """Why a full handshake would refuse, now, the client certificate a resumed session
    carries (``cert_expired``, ``cert_not_yet_valid``, ``unknown_ca``), or None.

    A resumed session brings only its leaf (the ticket holds no chain): it is verified
    against the current bundle with our own chain's intermediates (one mesh CA issues
    every workload), the RFC 5280 client profile, at ``now``. Costs ~0.2 ms; only a
    resumed handshake pays it.
    """
    leaf = x509.load_der_x509_certificate(der)
    if now > leaf.not_valid_after_utc:
        return "cert_expired"
    if now < leaf.not_valid_before_utc:
        return "cert_not_yet_valid"
    verifier = PolicyBuilder().store(Store(list(material.bundle.roots))).time(now).build_client_verifier()
    try:
        verifier.verify(leaf, list(material.chain[1:]))
    except VerificationError:
        return "unknown_ca"
    return None


def describe(material: TlsMaterial, now: datetime) -> dict[str, Any]:
    """JSON-ready facts about a loaded leaf and its bundle."""
    leaf = material.leaf
    info = describe_certificate(leaf, now)
    info.update(
        chain_length=len(material.chain),
        bundle=[fingerprint(root) for root in material.bundle.roots],
        files={
            "cert": str(material.files.cert),
            "key": str(material.files.key),
            "bundle": str(material.files.bundle),
        },
    )
    return info

