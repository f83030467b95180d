"""PEM loading errors name the file; writes are atomic with exact modes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from certs import pem
from certs.issue import new_key
from tests.helpers.pki import MeshPki


@pytest.fixture
def umask_zero() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.pem"
    with pytest.raises(pem.PemError) as info:
        pem.load_certificate(path)
    assert str(info.value) == f"{path}: file is missing"
    assert info.value.path == path


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(pem.PemError, match=f"^{tmp_path}: is a directory"):
        pem.load_private_key(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "secret.pem"
    path.write_bytes(b"x")
    path.chmod(0)
    with pytest.raises(pem.PemError, match="permission denied"):
        pem.read_file(path)


def test_not_pem(tmp_path: Path) -> None:
    path = tmp_path / "cert.pem"
    path.write_text("hello\n")
    with pytest.raises(pem.PemError, match=f"^{path}: not a PEM certificate file"):
        pem.load_certificates(path)
    with pytest.raises(pem.PemError, match=f"^{path}: not a PEM private key file"):
        pem.load_private_key(path)


def test_corrupt_pem(tmp_path: Path, pki: MeshPki) -> None:
    path = tmp_path / "cert.pem"
    good = pki.services["orders"].cert.read_bytes()
    path.write_bytes(good[:200] + b"!!!" + good[203:])
    with pytest.raises(pem.PemError, match=f"^{path}: corrupt PEM certificate$"):
        pem.load_certificates(path)
    key_path = tmp_path / "key.pem"
    key_path.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(pem.PemError, match=f"^{key_path}: corrupt"):
        pem.load_private_key(key_path)


def test_truncated_chain_file(tmp_path: Path, pki: MeshPki) -> None:
    # What a reader sees in the middle of a non-atomic write.
    path = tmp_path / "cert.pem"
    path.write_bytes(pki.services["orders"].cert.read_bytes()[:300])
    with pytest.raises(pem.PemError, match=str(path)):
        pem.load_certificates(path)


def test_encrypted_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(
        new_key().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    with pytest.raises(pem.PemError, match="encrypted"):
        pem.load_private_key(path)


def test_key_mismatch_names_key_and_cert(pki: MeshPki) -> None:
    orders, frontend = pki.services["orders"], pki.services["frontend"]
    cert = pem.load_certificate(orders.cert)
    key = pem.load_private_key(frontend.key)
    with pytest.raises(pem.PemError) as info:
        pem.check_key_matches(cert, key, orders.cert, frontend.key)
    assert str(info.value) == (
        f"{frontend.key}: private key does not match certificate {orders.cert}"
    )
    pem.check_key_matches(cert, pem.load_private_key(orders.key), orders.cert, orders.key)


def test_validity(pki: MeshPki) -> None:
    path = pki.services["orders"].cert
    cert = pem.load_certificate(path)
    pem.check_validity(cert, path, cert.not_valid_before_utc + timedelta(seconds=1))
    with pytest.raises(pem.PemError, match=f"^{path}: certificate expired at"):
        pem.check_validity(cert, path, cert.not_valid_after_utc)
    with pytest.raises(pem.PemError, match=f"^{path}: certificate not valid until"):
        pem.check_validity(cert, path, cert.not_valid_before_utc - timedelta(seconds=1))


def test_private_key_written_0600_whatever_the_umask(tmp_path: Path, umask_zero: None) -> None:
    path = tmp_path / "k.pem"
    key = new_key()
    pem.write_private_key(path, key)
    assert path.stat().st_mode & 0o777 == 0o600
    loaded = pem.load_private_key(path)
    assert loaded.private_numbers() == key.private_numbers()  # type: ignore[union-attr]


def test_certificates_written_0644_even_under_umask_077(tmp_path: Path, pki: MeshPki) -> None:
    old = os.umask(0o077)
    try:
        path = tmp_path / "c.pem"
        pem.write_certificates(path, [pki.ca.certificate])
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    assert pem.load_certificates(path) == [pki.ca.certificate]


def test_write_is_atomic_rename_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    pem.write_private_key(path, new_key())
    before = path.stat().st_ino
    pem.write_private_key(path, new_key())
    assert path.stat().st_ino != before  # replaced by rename, not rewritten in place
    assert [p.name for p in tmp_path.iterdir()] == ["k.pem"]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "c.pem"
    path.write_bytes(b"old")
    with pytest.raises(TypeError):
        pem.write_atomic(path, "not bytes", 0o644)  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["c.pem"]
