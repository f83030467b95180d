"""The workload side of issuance: make a key where it is used, ask with a CSR.

A key is generated on the workload and never leaves it; the CA only ever
sees the CSR. `issue_workload` does both halves in one process for the CLI
and for static meshes, still going through a real CSR so that path is the
one exercised.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certs import pem
from certs.ca import BUNDLE_FILE, DEFAULT_TTL, CertificateAuthority
from certs.identity import DEFAULT_TRUST_DOMAIN, SpiffeId

__all__ = ["IssuedFiles", "issue_workload", "make_csr", "new_key", "workload_paths"]


@dataclass(frozen=True, slots=True)
class IssuedFiles:
    """Where a workload's certificate chain, key and trust bundle were written."""

    cert: Path
    key: Path
    bundle: Path


def workload_paths(out_dir: Path | str, service: str) -> IssuedFiles:
    """The file names used for a service: <service>.pem, <service>-key.pem, bundle.pem."""
    out = Path(out_dir)
    return IssuedFiles(out / f"{service}.pem", out / f"{service}-key.pem", out / BUNDLE_FILE)


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh EC P-256 key: fast to make, small handshakes, what the CA accepts."""
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(
    key: ec.EllipticCurvePrivateKey,
    service: str,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
) -> bytes:
    """A PEM CSR for `service`, signed by `key`.

    It asks for the SPIFFE ID as its URI SAN so that a CSR is
    self-describing in logs; the CA sets the SAN itself regardless.
    """
    spiffe_id = SpiffeId(trust_domain, service)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def issue_workload(
    ca: CertificateAuthority,
    service: str,
    out_dir: Path | str,
    ttl: timedelta = DEFAULT_TTL,
    *,
    now: datetime | None = None,
) -> IssuedFiles:
    """Make a key and CSR for `service`, have `ca` sign it, write the three files.

    Order matters for a sidecar watching out_dir: the bundle goes first (so a
    new intermediate/root is trusted before a leaf that needs it appears),
    then the key, then the certificate; the watcher reloads once key and
    certificate match again.
    """
    files = workload_paths(out_dir, service)
    files.cert.parent.mkdir(parents=True, exist_ok=True)
    key = new_key()
    chain_pem = ca.sign_csr(make_csr(key, service, ca.trust_domain), service, ttl, now=now)
    pem.write_certificates(files.bundle, ca.bundle_pem())
    pem.write_private_key(files.key, key)
    pem.write_certificates(files.cert, chain_pem)
    return files
