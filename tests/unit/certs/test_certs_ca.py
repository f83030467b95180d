"""The CA: root and intermediate shapes, state directory, and what sign_csr decides."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from certs.ca import CAError, CertificateAuthority
from certs.identity import IdentityError, SpiffeId
from certs.issue import make_csr, new_key
from certs.pem import PemError


def ext(cert: x509.Certificate, cls: type) -> x509.Extension:  # type: ignore[type-arg]
    return cert.extensions.get_extension_for_class(cls)


def leaf_of(chain_pem: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(chain_pem)


def verify_client(roots: list[x509.Certificate], chain: list[x509.Certificate]) -> None:
    """Independent check of a chain by cryptography's own path builder."""
    verifier = PolicyBuilder().store(Store(roots)).build_client_verifier()
    verified = verifier.verify(chain[0], chain[1:])
    assert verified.chain[-1] in roots


@pytest.fixture
def root(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "ca")


def test_root_files_and_modes(tmp_path: Path, root: CertificateAuthority) -> None:
    state = tmp_path / "ca"
    assert state.stat().st_mode & 0o777 == 0o700
    assert (state / "ca-key.pem").stat().st_mode & 0o777 == 0o600
    assert (state / "ca.pem").stat().st_mode & 0o777 == 0o644
    assert (state / "bundle.pem").read_bytes() == (state / "ca.pem").read_bytes()


def test_root_certificate_shape(root: CertificateAuthority) -> None:
    cert = root.certificate
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(cert.public_key().curve, ec.SECP256R1)  # type: ignore[union-attr]
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 1
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.digital_signature
    ski = ext(cert, x509.SubjectKeyIdentifier).value.digest
    assert ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier == ski
    assert ext(cert, x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    ) == ["spiffe://pake.local"]
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert timedelta(days=3650) < life < timedelta(days=3660)
    assert root.is_root and root.chain == () and root.roots == (cert,)


def test_repr_does_not_show_the_key(root: CertificateAuthority) -> None:
    assert "key=" not in repr(root)


def test_init_refuses_to_overwrite(tmp_path: Path, root: CertificateAuthority) -> None:
    with pytest.raises(CAError, match="already exists"):
        CertificateAuthority.init(tmp_path / "ca")


def test_init_refuses_bad_trust_domain(tmp_path: Path) -> None:
    with pytest.raises(IdentityError):
        CertificateAuthority.init(tmp_path / "ca", "Not_A_Domain")
    assert not (tmp_path / "ca").exists()


def test_load_round_trip(tmp_path: Path) -> None:
    made = CertificateAuthority.init(tmp_path / "ca", "mesh.example")
    loaded = CertificateAuthority.load(tmp_path / "ca")
    assert loaded.trust_domain == "mesh.example"
    assert loaded.certificate == made.certificate
    assert loaded.roots == made.roots
    assert loaded.key.private_numbers() == made.key.private_numbers()


def test_load_errors_name_the_problem(tmp_path: Path, root: CertificateAuthority) -> None:
    with pytest.raises(CAError, match="no CA state directory"):
        CertificateAuthority.load(tmp_path / "missing")
    other = CertificateAuthority.init(tmp_path / "other")
    (tmp_path / "ca" / "ca-key.pem").write_bytes((tmp_path / "other" / "ca-key.pem").read_bytes())
    with pytest.raises(PemError, match="ca-key.pem: private key does not match"):
        CertificateAuthority.load(tmp_path / "ca")
    assert other.trust_domain == "pake.local"


# === sign_csr ===


def test_sign_csr_sets_identity_and_profile(root: CertificateAuthority) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    csr = make_csr(new_key(), "orders")
    chain = leaf_of(root.sign_csr(csr, "orders", timedelta(hours=2), now=now))
    assert len(chain) == 1
    leaf = chain[0]
    uris = ext(leaf, x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    )
    assert uris == ["spiffe://pake.local/service/orders"]
    assert ext(leaf, x509.BasicConstraints).value.ca is False
    ku = ext(leaf, x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign
    assert set(ext(leaf, x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    }
    assert ext(leaf, x509.AuthorityKeyIdentifier).value.key_identifier == ext(
        root.certificate, x509.SubjectKeyIdentifier
    ).value.digest
    assert leaf.not_valid_before_utc == now - timedelta(minutes=1)
    assert leaf.not_valid_after_utc == now + timedelta(hours=2)
    assert leaf.issuer == root.certificate.subject
    verify_client(list(root.roots), chain)


def test_serials_are_random(root: CertificateAuthority) -> None:
    serials = {
        leaf_of(root.sign_csr(make_csr(new_key(), "orders"), "orders"))[0].serial_number
        for _ in range(3)
    }
    assert len(serials) == 3
    assert all(s.bit_length() > 64 for s in serials)


def test_csr_asking_for_other_names_gets_only_the_spiffe_id(root: CertificateAuthority) -> None:
    key = new_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "admin")]))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier("spiffe://pake.local/service/admin"),
                    x509.UniformResourceIdentifier("spiffe://evil.example/service/orders"),
                    x509.DNSName("pakectl.pake.local"),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    leaf = leaf_of(root.sign_csr(csr, "orders"))[0]
    san = ext(leaf, x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier("spiffe://pake.local/service/orders")]
    assert ext(leaf, x509.BasicConstraints).value.ca is False
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "orders"


def test_csr_with_bad_signature_is_refused(root: CertificateAuthority) -> None:
    good = x509.load_pem_x509_csr(make_csr(new_key(), "orders"))
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # inside the signature
    bad = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CAError, match="signature does not verify"):
        root.sign_csr(bad, "orders")


def test_non_pem_csr_is_refused(root: CertificateAuthority) -> None:
    with pytest.raises(CAError, match="not a valid PEM"):
        root.sign_csr(b"hello", "orders")


def test_rsa_csr_is_refused(root: CertificateAuthority) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(CAError, match="EC P-256"):
        root.sign_csr(csr, "orders")


def test_bad_service_name_and_ttl(root: CertificateAuthority) -> None:
    csr = make_csr(new_key(), "orders")
    with pytest.raises(IdentityError) as info:
        root.sign_csr(csr, "Orders!")
    assert info.value.reason == "bad_service"
    with pytest.raises(CAError, match="ttl"):
        root.sign_csr(csr, "orders", timedelta(0))


def test_ttl_is_clamped_to_the_ca_lifetime(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", validity=timedelta(hours=1))
    leaf = leaf_of(ca.sign_csr(make_csr(new_key(), "orders"), "orders", timedelta(days=1)))[0]
    assert leaf.not_valid_after_utc == ca.certificate.not_valid_after_utc


def test_expired_ca_refuses_to_sign(root: CertificateAuthority) -> None:
    later = root.certificate.not_valid_after_utc + timedelta(seconds=1)
    with pytest.raises(CAError, match="expired"):
        root.sign_csr(make_csr(new_key(), "orders"), "orders", now=later)


# === intermediates ===


def test_intermediate_chain_verifies(tmp_path: Path, root: CertificateAuthority) -> None:
    inter = CertificateAuthority.init_intermediate(tmp_path / "ca", tmp_path / "int")
    assert not inter.is_root
    assert inter.roots == root.roots
    assert inter.trust_domain == "pake.local"
    bc = ext(inter.certificate, x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 0
    assert ext(inter.certificate, x509.AuthorityKeyIdentifier).value.key_identifier == ext(
        root.certificate, x509.SubjectKeyIdentifier
    ).value.digest
    chain = leaf_of(inter.sign_csr(make_csr(new_key(), "orders"), "orders"))
    assert chain[1:] == [inter.certificate]  # leaf + intermediate, never the root
    verify_client(list(root.roots), chain)
    root_pem = (tmp_path / "ca" / "ca.pem").read_bytes()
    assert (tmp_path / "int" / "bundle.pem").read_bytes() == root_pem
    assert (tmp_path / "int" / "ca-key.pem").stat().st_mode & 0o777 == 0o600


def test_intermediate_loads_with_its_chain(tmp_path: Path, root: CertificateAuthority) -> None:
    made = CertificateAuthority.init_intermediate(tmp_path / "ca", tmp_path / "int")
    loaded = CertificateAuthority.load(tmp_path / "int")
    assert loaded.certificate == made.certificate
    assert loaded.chain == (made.certificate,)
    assert loaded.roots == (root.certificate,)


def test_intermediate_cannot_sign_another_ca(tmp_path: Path, root: CertificateAuthority) -> None:
    CertificateAuthority.init_intermediate(tmp_path / "ca", tmp_path / "int")
    with pytest.raises(CAError, match="path length 0"):
        CertificateAuthority.init_intermediate(tmp_path / "int", tmp_path / "int2")


def test_intermediate_does_not_outlive_its_root(tmp_path: Path) -> None:
    CertificateAuthority.init(tmp_path / "ca", validity=timedelta(days=30))
    inter = CertificateAuthority.init_intermediate(tmp_path / "ca", tmp_path / "int")
    root = CertificateAuthority.load(tmp_path / "ca")
    assert inter.certificate.not_valid_after_utc == root.certificate.not_valid_after_utc


def test_spiffe_id_of_issued_leaf(root: CertificateAuthority) -> None:
    leaf = leaf_of(root.sign_csr(make_csr(new_key(), "orders"), "orders"))[0]
    uri = ext(leaf, x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    )[0]
    assert SpiffeId.parse(uri) == SpiffeId("pake.local", "orders")
