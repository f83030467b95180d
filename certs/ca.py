"""The mesh certificate authority: a root or an intermediate that signs CSRs.

A CA lives in a state directory (0700):
  ca.pem       this CA's certificate, then any intermediates above it (not the root)
  ca-key.pem   its EC P-256 key (0600)
  bundle.pem   the trust bundle: the root(s) that workloads trust
The CA never sees a workload's key: it signs CSRs, and it alone decides what
a certificate says - the identity comes from `service`, never from the CSR.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from certs import pem, profile
from certs.bundle import TrustBundle
from certs.describe import uri_sans
from certs.identity import DEFAULT_TRUST_DOMAIN, IdentityError, SpiffeId, check_trust_domain

__all__ = [
    "BUNDLE_FILE",
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "CLOCK_SKEW",
    "DEFAULT_TTL",
    "INTERMEDIATE_VALIDITY",
    "ROOT_VALIDITY",
    "CAError",
    "CertificateAuthority",
]

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
BUNDLE_FILE = "bundle.pem"
ROOT_VALIDITY = timedelta(days=3652)
INTERMEDIATE_VALIDITY = timedelta(days=1826)
DEFAULT_TTL = timedelta(hours=24)
# Back-date not_before so a peer whose clock runs a little behind ours
# does not reject a certificate issued a moment ago.
CLOCK_SKEW = timedelta(minutes=1)
# A root may have one level of intermediates below it, and no more.
ROOT_PATH_LENGTH = 1
STATE_DIR_MODE = 0o700


class CAError(Exception):
    """The CA cannot do what was asked: bad CSR, expired CA, existing state."""


@dataclass(frozen=True)
class CertificateAuthority:
    """A loaded CA: its certificate and key, what lies above it, and the roots.

    Immutable: `init*` write a new state directory and return the CA; `load`
    reads one. `sign_csr` is the only operation, and it is a pure function of
    the CA, the CSR and the clock.
    """

    trust_domain: str
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey = field(repr=False)
    # Intermediates between this CA and the root, nearest first; () for a root.
    parents: tuple[x509.Certificate, ...]
    roots: tuple[x509.Certificate, ...]

    @property
    def is_root(self) -> bool:
        """True for a self-signed root: leaves then need no chain after them."""
        return self.certificate.subject == self.certificate.issuer and not self.parents

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """What an issued leaf carries after itself: intermediates, never the root."""
        if self.is_root:
            return ()
        return (self.certificate, *self.parents)

    def bundle_pem(self) -> bytes:
        """The trust bundle workloads must hold to verify this CA's leaves."""
        return pem.certificates_to_pem(self.roots)

    # === creating and loading ===

    @classmethod
    def init(
        cls,
        state_dir: Path | str,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        validity: timedelta = ROOT_VALIDITY,
        *,
        now: datetime | None = None,
    ) -> CertificateAuthority:
        """Create a self-signed EC P-256 root in a new (or empty) state_dir."""
        check_trust_domain(trust_domain)
        state = _prepare_state_dir(Path(state_dir))
        now = _utcnow(now)
        key = ec.generate_private_key(ec.SECP256R1())
        name = profile.ca_name(trust_domain, "Root")
        cert = profile.ca_builder(
            subject=name,
            issuer=name,
            public_key=key.public_key(),
            issuer_public_key=key.public_key(),
            trust_domain=trust_domain,
            not_before=now - CLOCK_SKEW,
            not_after=now + validity,
            path_length=ROOT_PATH_LENGTH,
        ).sign(key, hashes.SHA256())
        ca = cls(trust_domain, cert, key, parents=(), roots=(cert,))
        ca._save(state)
        return ca

    @classmethod
    def init_intermediate(
        cls,
        root_state_dir: Path | str,
        state_dir: Path | str,
        validity: timedelta = INTERMEDIATE_VALIDITY,
        *,
        now: datetime | None = None,
    ) -> CertificateAuthority:
        """Create an intermediate CA signed by the CA in root_state_dir.

        The root's key can then stay offline: only the intermediate's state
        directory needs to live where certificates are issued.
        """
        parent = cls.load(root_state_dir)
        if _path_length(parent.certificate) == 0:
            raise CAError(f"{root_state_dir}: this CA may not sign further CAs (path length 0)")
        state = _prepare_state_dir(Path(state_dir))
        now = _utcnow(now)
        parent._check_current(now)
        key = ec.generate_private_key(ec.SECP256R1())
        parent_length = _path_length(parent.certificate)
        cert = profile.ca_builder(
            subject=profile.ca_name(parent.trust_domain, "Intermediate"),
            issuer=parent.certificate.subject,
            public_key=key.public_key(),
            issuer_public_key=parent.key.public_key(),
            trust_domain=parent.trust_domain,
            not_before=now - CLOCK_SKEW,
            # An intermediate cannot usefully outlive the CA that signed it.
            not_after=min(now + validity, parent.certificate.not_valid_after_utc),
            path_length=None if parent_length is None else parent_length - 1,
        ).sign(parent.key, hashes.SHA256())
        ca = cls(parent.trust_domain, cert, key, parents=parent.chain, roots=parent.roots)
        ca._save(state)
        return ca

    @classmethod
    def load(cls, state_dir: Path | str) -> CertificateAuthority:
        """Read a CA state directory; PemError/CAError say which file is wrong."""
        state = Path(state_dir)
        if not state.is_dir():
            raise CAError(f"{state}: no CA state directory here (run `pakectl ca init`)")
        cert_path, key_path = state / CA_CERT_FILE, state / CA_KEY_FILE
        certs = pem.load_certificates(cert_path)
        key = pem.load_private_key(key_path)
        pem.check_key_matches(certs[0], key, cert_path, key_path)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise pem.PemError(key_path, "CA key must be an EC key")
        bundle = TrustBundle.load(state / BUNDLE_FILE)
        trust_domain = _trust_domain_of(certs[0], cert_path)
        return cls(trust_domain, certs[0], key, parents=tuple(certs[1:]), roots=bundle.roots)

    def _save(self, state: Path) -> None:
        # Key first: a crash in between leaves no certificate without its key.
        pem.write_private_key(state / CA_KEY_FILE, self.key)
        pem.write_certificates(state / BUNDLE_FILE, self.roots)
        pem.write_certificates(state / CA_CERT_FILE, [self.certificate, *self.parents])

    # === signing ===

    def sign_csr(
        self,
        csr_pem: bytes,
        service: str,
        ttl: timedelta = DEFAULT_TTL,
        *,
        now: datetime | None = None,
    ) -> bytes:
        """Sign a workload CSR for `service`; returns PEM leaf + intermediates.

        The CSR contributes only its public key (after its signature proves
        the requester holds the private key). Whatever subject or SANs it
        asks for are ignored: the URI SAN is always
        spiffe://<trust domain>/service/<service>. Raises CAError, or
        IdentityError(bad_service) for a bad service name.
        """
        spiffe_id = SpiffeId(self.trust_domain, service)
        if ttl <= timedelta(0):
            raise CAError(f"ttl must be positive, got {ttl}")
        csr = _parse_csr(csr_pem)
        public_key = csr.public_key()
        if not (
            isinstance(public_key, ec.EllipticCurvePublicKey)
            and isinstance(public_key.curve, ec.SECP256R1)
        ):
            raise CAError("CSR key must be EC P-256")
        now = _utcnow(now)
        self._check_current(now)
        leaf = profile.leaf_builder(
            common_name=service,
            uris=[str(spiffe_id)],
            public_key=public_key,
            issuer=self.certificate,
            not_before=now - CLOCK_SKEW,
            # Clamped: a leaf outliving its CA would fail verification anyway.
            not_after=min(now + ttl, self.certificate.not_valid_after_utc),
        ).sign(self.key, hashes.SHA256())
        return pem.certificates_to_pem([leaf, *self.chain])

    def _check_current(self, now: datetime) -> None:
        if now >= self.certificate.not_valid_after_utc:
            raise CAError(
                f"CA certificate expired at {self.certificate.not_valid_after_utc.isoformat()}"
            )


def _parse_csr(csr_pem: bytes) -> x509.CertificateSigningRequest:
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        raise CAError("CSR is not a valid PEM certificate request") from None
    if not csr.is_signature_valid:
        raise CAError("CSR signature does not verify")
    return csr


def _trust_domain_of(cert: x509.Certificate, source: Path) -> str:
    """The trust domain recorded as `spiffe://<td>` in the CA certificate."""
    prefix = "spiffe://"
    for uri in uri_sans(cert):
        trust_domain = uri[len(prefix) :] if uri.startswith(prefix) else ""
        try:
            return check_trust_domain(trust_domain)
        except IdentityError:
            continue
    raise CAError(f"{source}: CA certificate carries no spiffe://<trust domain> URI SAN")


def _path_length(cert: x509.Certificate) -> int | None:
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    return bc.path_length


def _prepare_state_dir(state: Path) -> Path:
    """Create state (0700), refusing to overwrite an existing CA."""
    if (state / CA_KEY_FILE).exists() or (state / CA_CERT_FILE).exists():
        raise CAError(f"{state}: a CA already exists here; refusing to overwrite it")
    state.mkdir(mode=STATE_DIR_MODE, parents=True, exist_ok=True)
    state.chmod(STATE_DIR_MODE)
    return state


def _utcnow(now: datetime | None) -> datetime:
    return datetime.now(UTC) if now is None else now
