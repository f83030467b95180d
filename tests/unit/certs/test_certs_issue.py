"""Workload issuance: key made locally, CSR, files written with the right modes."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from certs import pem
from certs.ca import CertificateAuthority
from certs.identity import IdentityError, workload_identity
from certs.issue import issue_workload, make_csr, new_key, workload_paths


def test_new_key_is_p256() -> None:
    key = new_key()
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)


def test_csr_is_signed_and_names_the_spiffe_id() -> None:
    key = new_key()
    csr = x509.load_pem_x509_csr(make_csr(key, "orders", "mesh.example"))
    assert csr.is_signature_valid
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://mesh.example/service/orders"
    ]
    assert csr.public_key() == key.public_key()


def test_csr_refuses_bad_names() -> None:
    with pytest.raises(IdentityError):
        make_csr(new_key(), "no spaces")


def test_issue_workload_writes_three_files(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    files = issue_workload(ca, "orders", tmp_path / "out" / "nested", timedelta(minutes=30))
    assert files == workload_paths(tmp_path / "out" / "nested", "orders")
    assert files.cert.name == "orders.pem"
    assert files.key.name == "orders-key.pem"
    assert files.bundle.name == "bundle.pem"
    assert files.key.stat().st_mode & 0o777 == 0o600
    assert files.cert.stat().st_mode & 0o777 == 0o644
    chain = pem.load_certificates(files.cert)
    key = pem.load_private_key(files.key)
    pem.check_key_matches(chain[0], key, files.cert, files.key)
    assert pem.load_certificates(files.bundle) == [ca.certificate]
    der = chain[0].public_bytes(serialization.Encoding.DER)
    assert workload_identity(der, "pake.local", "client").service == "orders"
    life = chain[0].not_valid_after_utc - chain[0].not_valid_before_utc
    assert life == timedelta(minutes=31)  # ttl + the one-minute back-dating


def test_reissue_makes_a_new_key(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    first = issue_workload(ca, "orders", tmp_path / "out")
    old_key = first.key.read_bytes()
    issue_workload(ca, "orders", tmp_path / "out")
    assert first.key.read_bytes() != old_key


def test_issue_under_intermediate_writes_chain_and_root_bundle(tmp_path: Path) -> None:
    root = CertificateAuthority.init(tmp_path / "root")
    inter = CertificateAuthority.init_intermediate(tmp_path / "root", tmp_path / "int")
    files = issue_workload(inter, "orders", tmp_path / "out")
    chain = pem.load_certificates(files.cert)
    assert chain[1:] == [inter.certificate]
    assert pem.load_certificates(files.bundle) == [root.certificate]
