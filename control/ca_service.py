"""The control plane's CA: the `pakectl ca init` state directory, used to sign CSRs.

It signs workload CSRs (after checking that the CSR asks for the name it is being signed
for), gives out the trust bundle and the CA fingerprint that join tokens carry, and serves
the listen port with a server certificate of its own (SPIFFE service ``pake-control``),
re-issued at 2/3 of its life and swapped in per handshake through an SNI callback.
"""

from __future__ import annotations

import contextlib
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding

from certs import pem
from certs.ca import CA_KEY_FILE, CAError, CertificateAuthority
from certs.identity import DEFAULT_TRUST_DOMAIN, IdentityError, SpiffeId, workload_identity
from certs.issue import make_csr, new_key
from sidecar.discovery.protocol import CONTROL_SERVICE, fingerprint_der

__all__ = ["CAService", "CsrRefused", "check_csr_name", "peer_service"]

SERVER_CERT_TTL = timedelta(days=7)


class CsrRefused(Exception):
    """A CSR that cannot be signed for the service asked: the text says why."""


def check_csr_name(csr_pem: bytes, service: str, trust_domain: str) -> None:
    """A CSR may only ask for the service it is signed for (its CN and URI SAN, if present).

    The CA sets the identity itself regardless; refusing a mismatch tells an operator that a
    sidecar holds the wrong token instead of silently certifying it as something else.
    """
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        raise CsrRefused("CSR is not a valid PEM certificate request") from None
    if not csr.is_signature_valid:
        raise CsrRefused("CSR signature does not verify")
    names = [a.value for a in csr.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    wanted = str(SpiffeId(trust_domain, service))
    for uri in uris:
        if uri != wanted:
            raise CsrRefused(f"CSR asks for {uri}, but this request may only be for {wanted}")
    for name in names:
        if name != service:
            raise CsrRefused(f"CSR asks for CN={name}, but this request may only be for {service!r}")


class CAService:
    """The loaded CA plus the listen port's TLS. Build with ``load_or_init`` (blocking: call it
    off the event loop or before it starts)."""

    def __init__(self, ca_dir: Path, ca: CertificateAuthority, workload_ttl: timedelta) -> None:
        self.ca_dir = ca_dir
        self.ca = ca
        self.workload_ttl = workload_ttl
        self._server_dir = ca_dir.parent / "server"
        self._server_ctx: ssl.SSLContext | None = None
        self.server_not_after: datetime | None = None

    @classmethod
    def load_or_init(cls, ca_dir: Path, workload_ttl: timedelta,
                     trust_domain: str = DEFAULT_TRUST_DOMAIN) -> tuple[CAService, bool]:
        """The CA in ca_dir, created when there is none; returns (service, created)."""
        created = not (ca_dir / CA_KEY_FILE).exists()
        ca = (CertificateAuthority.init(ca_dir, trust_domain) if created
              else CertificateAuthority.load(ca_dir))
        return cls(ca_dir, ca, workload_ttl), created

    @property
    def trust_domain(self) -> str:
        return self.ca.trust_domain

    @property
    def root(self) -> x509.Certificate:
        """The root this CA's leaves chain to (the CA itself, when it is a root)."""
        return self.ca.certificate if self.ca.is_root else self.ca.roots[0]

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the root's DER: what a join token carries."""
        return fingerprint_der(self.root.public_bytes(Encoding.DER))

    def root_fingerprints(self) -> tuple[str, ...]:
        """Every root of the trust bundle (two while a CA rotation overlaps them)."""
        return tuple(fingerprint_der(r.public_bytes(Encoding.DER)) for r in self.ca.roots)

    def root_of(self, leaf: x509.Certificate) -> str | None:
        """The fingerprint of the bundle root that ``leaf`` chains to, None if none does.

        Roots are told apart by signature, not by name: during a rotation two roots may share
        a subject."""
        for root in self.ca.roots:
            with contextlib.suppress(ValueError, TypeError, InvalidSignature):
                leaf.verify_directly_issued_by(root)
                return fingerprint_der(root.public_bytes(Encoding.DER))
        if not self.ca.is_root:
            with contextlib.suppress(ValueError, TypeError, InvalidSignature):
                leaf.verify_directly_issued_by(self.ca.certificate)
                return self.fingerprint
        return None

    def swap(self, ca: CertificateAuthority) -> bool:
        """Use ``ca`` (signer and bundle) from now on; True when the signer changed. Blocking
        (a new listen certificate when the signer changed, a new verify context always): run
        it off the event loop."""
        signer_changed = ca.certificate != self.ca.certificate
        self.ca = ca
        if self._server_ctx is not None:
            if signer_changed:
                self.renew_server_certificate()
            else:
                self._server_ctx = self._build_server_context()
        return signer_changed

    def bundle_pem(self) -> str:
        return self.ca.bundle_pem().decode("ascii")

    def sign(self, csr_pem: bytes, service: str, *, ttl: timedelta | None = None) -> str:
        """A workload chain for ``service`` (CSR checked by name first); CsrRefused if not."""
        if service == CONTROL_SERVICE:
            raise CsrRefused(f"{CONTROL_SERVICE!r} is the control plane's own name")
        check_csr_name(csr_pem, service, self.trust_domain)
        try:
            return self.ca.sign_csr(csr_pem, service, ttl or self.workload_ttl).decode("ascii")
        except (CAError, IdentityError) as exc:
            raise CsrRefused(str(exc)) from None

    # === the listen port's own certificate ===

    def listen_context(self) -> ssl.SSLContext:
        """The context the listen port is bound with: its SNI callback moves each handshake
        onto the current server context, so a renewed certificate applies to new connections."""
        if self._server_ctx is None:
            self.renew_server_certificate()
        dispatcher = self._build_server_context()
        dispatcher.sni_callback = self._select
        return dispatcher

    def _select(self, ssl_object: ssl.SSLObject | ssl.SSLSocket, _name: str | None,
                _ctx: ssl.SSLContext) -> None:
        assert self._server_ctx is not None  # set before the listen port exists
        ssl_object.context = self._server_ctx

    def renew_server_certificate(self) -> None:
        """Issue a fresh key and certificate for the listen port (blocking file writes)."""
        self._server_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = new_key()
        chain = self.ca.sign_csr(make_csr(key, CONTROL_SERVICE, self.trust_domain),
                                 CONTROL_SERVICE, SERVER_CERT_TTL)
        pem.write_private_key(self._server_dir / "server-key.pem", key)
        pem.write_certificates(self._server_dir / "server.pem", chain)
        self._server_ctx = self._build_server_context()
        self.server_not_after = pem.parse_certificates(chain, "server.pem")[0].not_valid_after_utc

    def server_renew_delay(self, now: datetime | None = None) -> float:
        """Seconds until the listen certificate reaches 2/3 of its life."""
        if self.server_not_after is None:
            return 0.0
        now = now or datetime.now(UTC)
        renew_at = self.server_not_after - SERVER_CERT_TTL / 3
        return max(1.0, (renew_at - now).total_seconds())

    def _build_server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # Optional: /v1/join and /v1/bundle come before a sidecar has a certificate;
        # /v1/stream checks that one was presented (and the handshake verified it).
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        ctx.load_verify_locations(cadata=self.bundle_pem())
        ctx.load_cert_chain(self._server_dir / "server.pem", self._server_dir / "server-key.pem")
        return ctx


def peer_service(der: bytes | None, trust_domain: str) -> SpiffeId:
    """The SPIFFE ID of a stream's client certificate; IdentityError if none or not a workload."""
    if not der:
        raise IdentityError("no_uri_san", "no client certificate: the stream requires mTLS")
    return workload_identity(der, trust_domain, "client")

