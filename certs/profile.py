"""What the mesh's certificates look like: root, intermediate and workload leaf.

One place decides the extensions of each kind, so the CA and the test
factory (tests/helpers/pki.py) build exactly the same shapes; the test factory
only varies the parameters a bad certificate needs. Pure: builds, never signs
files or reads clocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPublicKeyTypes,
    CertificatePublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "WORKLOAD_EKU",
    "ca_builder",
    "ca_name",
    "leaf_builder",
    "trust_domain_uri",
]

WORKLOAD_EKU: tuple[x509.ObjectIdentifier, ...] = (
    ExtendedKeyUsageOID.SERVER_AUTH,
    ExtendedKeyUsageOID.CLIENT_AUTH,
)


def trust_domain_uri(trust_domain: str) -> str:
    """The SPIFFE ID of a trust domain itself, carried by its CA certificates.

    The SPIFFE X.509-SVID spec allows a signing certificate to carry
    `spiffe://<td>`; we use it so a CA directory records its trust domain in
    the certificate rather than in a side file.
    """
    return f"spiffe://{trust_domain}"


def ca_name(trust_domain: str, kind: str) -> x509.Name:
    """Subject of a CA certificate, e.g. `CN=PAKE Mesh Root CA,O=pake.local`."""
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, f"PAKE Mesh {kind} CA"),
        ]
    )


def ca_builder(
    *,
    subject: x509.Name,
    issuer: x509.Name,
    public_key: CertificatePublicKeyTypes,
    issuer_public_key: CertificateIssuerPublicKeyTypes,
    trust_domain: str,
    not_before: datetime,
    not_after: datetime,
    path_length: int | None,
) -> x509.CertificateBuilder:
    """A root (subject == issuer) or intermediate CA certificate."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public_key),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(trust_domain_uri(trust_domain))]
            ),
            critical=False,
        )
    )


def leaf_builder(
    *,
    common_name: str,
    uris: Sequence[str],
    public_key: CertificatePublicKeyTypes,
    issuer: x509.Certificate,
    not_before: datetime,
    not_after: datetime,
    eku: Sequence[x509.ObjectIdentifier] | None = WORKLOAD_EKU,
    ca: bool = False,
) -> x509.CertificateBuilder:
    """A workload certificate: its identity is the URI SAN, not the subject.

    The CA always passes one SPIFFE URI and WORKLOAD_EKU; other values exist
    for the test factory's deliberately bad certificates. eku=None omits the
    extension.
    """
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(issuer.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True
        )
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_authority_key_identifier(issuer), critical=False)
    )
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    return builder


def _authority_key_identifier(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    # The issuer's own SKI, so AKI/SKI chain-building always agrees.
    # Every CA we make has an SKI (ca_builder adds it).
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
