"""Trust bundles: the set of root certificates a workload trusts.

A bundle may hold several roots so that a CA rotation never breaks a
connection: first every workload gets bundle = old + new roots, then leaves
are re-issued by the new CA, then the bundle shrinks to the new root only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from certs import pem
from certs.describe import fingerprint, is_ca

__all__ = ["RootInfo", "TrustBundle"]


@dataclass(frozen=True, slots=True)
class RootInfo:
    """One root of a bundle, as an operator wants to see it."""

    fingerprint: str
    subject: str
    not_before: datetime
    not_after: datetime


@dataclass(frozen=True)
class TrustBundle:
    """An ordered, duplicate-free tuple of CA certificates."""

    roots: tuple[x509.Certificate, ...]

    def __post_init__(self) -> None:
        if not self.roots:
            raise ValueError("a trust bundle needs at least one root")

    @classmethod
    def from_pem(cls, data: bytes, source: Path | str = "<bundle>") -> TrustBundle:
        """Parse PEM bytes; every certificate must be a CA certificate."""
        certs = pem.parse_certificates(data, source)
        for cert in certs:
            if not is_ca(cert):
                raise pem.PemError(
                    source, f"{cert.subject.rfc4514_string()} is not a CA certificate"
                )
        return cls(tuple(_dedupe(certs)))

    @classmethod
    def load(cls, path: Path | str) -> TrustBundle:
        """Read a bundle file; PemError names the file if it is unusable."""
        return cls.from_pem(pem.read_file(path), path)

    @classmethod
    def merge_files(cls, paths: Iterable[Path | str]) -> TrustBundle:
        """Load several root/bundle files and merge them, first file first."""
        bundles = [cls.load(p) for p in paths]
        if not bundles:
            raise ValueError("no bundle files given")
        return bundles[0].merge(*bundles[1:])

    def merge(self, *others: TrustBundle) -> TrustBundle:
        """This bundle's roots, then the others' new ones (duplicates dropped)."""
        certs = list(self.roots)
        for other in others:
            certs.extend(other.roots)
        return TrustBundle(tuple(_dedupe(certs)))

    def to_pem(self) -> bytes:
        return pem.certificates_to_pem(self.roots)

    def write(self, path: Path | str) -> None:
        """Write atomically (0644): a watching sidecar sees old or new, never half."""
        pem.write_certificates(path, self.to_pem())

    def entries(self) -> list[RootInfo]:
        """Fingerprint, subject and validity of each root, in bundle order."""
        return [
            RootInfo(
                fingerprint=fingerprint(c),
                subject=c.subject.rfc4514_string(),
                not_before=c.not_valid_before_utc,
                not_after=c.not_valid_after_utc,
            )
            for c in self.roots
        ]


def _dedupe(certs: Iterable[x509.Certificate]) -> list[x509.Certificate]:
    seen: set[bytes] = set()
    out = []
    for cert in certs:
        fp = cert.fingerprint(hashes.SHA256())
        if fp not in seen:
            seen.add(fp)
            out.append(cert)
    return out
