"""Certificates as facts a person or a JSON client can read.

Shared by the sidecar's TlsContextSource.info() and `pakectl certs show`, so
both say the same thing in the same words, and home of the small readers
(URI SANs, is it a CA, fingerprint) the other modules share. Pure.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes

__all__ = ["describe_certificate", "fingerprint", "is_ca", "uri_sans"]


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER, as lowercase hex with colons (what openssl prints)."""
    return cert.fingerprint(hashes.SHA256()).hex(":")


def uri_sans(cert: x509.Certificate) -> list[str]:
    """The URI SubjectAlternativeNames of a certificate, in order."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def is_ca(cert: x509.Certificate) -> bool:
    """True if BasicConstraints says CA; a certificate without it is not one."""
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def describe_certificate(cert: x509.Certificate, now: datetime) -> dict[str, Any]:
    """Subject, SPIFFE ID, serial (hex), validity and seconds left; JSON-ready.

    `spiffe_id` is the single URI SAN when there is exactly one, else None;
    `uri_sans` lists them all so a bad certificate can be diagnosed.
    """
    uris = uri_sans(cert)
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "spiffe_id": uris[0] if len(uris) == 1 else None,
        "uri_sans": uris,
        "is_ca": is_ca(cert),
        "serial": format(cert.serial_number, "x"),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "seconds_to_expiry": int((cert.not_valid_after_utc - now).total_seconds()),
        "fingerprint": fingerprint(cert),
    }
