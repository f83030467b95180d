"""Reading and writing PEM files, with errors an operator can act on.

Rules: every failure is a PemError whose one-line message names the file and
what is wrong with it. Writes are atomic (temp file in the same directory,
fsync, rename) so a reader - the sidecar's file watcher - never sees half a
file; private keys are created 0600 and never pass through a wider mode.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

__all__ = [
    "fsync_dir",
    "CERT_MODE",
    "KEY_MODE",
    "PemError",
    "SigningKey",
    "certificates_to_pem",
    "check_key_matches",
    "check_validity",
    "key_to_pem",
    "load_certificate",
    "load_certificates",
    "load_private_key",
    "parse_certificates",
    "parse_private_key",
    "read_file",
    "write_atomic",
    "write_certificates",
    "write_private_key",
]

KEY_MODE = 0o600
CERT_MODE = 0o644

# Keys that can sign a certificate or a TLS handshake (not X25519 and friends).
SigningKey = (
    ec.EllipticCurvePrivateKey
    | rsa.RSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)


class PemError(Exception):
    """A certificate or key file is missing, unreadable, corrupt or unusable.

    str(err) is `<path>: <problem>`, one line, ready for a log or stderr.
    """

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)
        self.problem = problem


# === reading ===


def read_file(path: Path | str) -> bytes:
    """Read a whole file, turning OS errors into a PemError that says which."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PemError(path, "file is missing") from None
    except IsADirectoryError:
        raise PemError(path, "is a directory, expected a PEM file") from None
    except PermissionError:
        raise PemError(path, "permission denied reading file") from None
    except OSError as exc:
        raise PemError(path, f"cannot read file: {exc.strerror or exc}") from None


def parse_certificates(data: bytes, source: Path | str) -> list[x509.Certificate]:
    """Parse every certificate in PEM `data`; `source` names it in errors."""
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise PemError(source, "not a PEM certificate file (no BEGIN CERTIFICATE block)")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise PemError(source, "corrupt PEM certificate") from None


def load_certificates(path: Path | str) -> list[x509.Certificate]:
    """All certificates of a PEM file (a leaf and its chain, or a bundle)."""
    return parse_certificates(read_file(path), path)


def load_certificate(path: Path | str) -> x509.Certificate:
    """The first certificate of a PEM file: the leaf of a chain file."""
    return load_certificates(path)[0]


def parse_private_key(data: bytes, source: Path | str) -> SigningKey:
    """Parse an unencrypted PEM private key; `source` names it in errors."""
    if b"PRIVATE KEY-----" not in data:
        raise PemError(source, "not a PEM private key file (no BEGIN PRIVATE KEY block)")
    try:
        key: PrivateKeyTypes = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise PemError(
            source, "private key is encrypted; PAKE Mesh needs an unencrypted key"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise PemError(source, "corrupt or unsupported PEM private key") from None
    if not isinstance(key, SigningKey):
        raise PemError(source, f"unsupported private key type {type(key).__name__}")
    return key


def load_private_key(path: Path | str) -> SigningKey:
    """Load an unencrypted PEM private key file."""
    return parse_private_key(read_file(path), path)


# === checking ===


def check_key_matches(
    cert: x509.Certificate,
    key: SigningKey,
    cert_path: Path | str,
    key_path: Path | str,
) -> None:
    """Raise PemError (naming the key file) unless `key` belongs to `cert`.

    A rotation that replaced one file but not yet the other lands here.
    """
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*raw) != key.public_key().public_bytes(*raw):
        raise PemError(key_path, f"private key does not match certificate {cert_path}")


def check_validity(cert: x509.Certificate, source: Path | str, now: datetime) -> None:
    """Raise PemError unless `now` (aware, UTC) lies within the validity period."""
    if now >= cert.not_valid_after_utc:
        raise PemError(
            source, f"certificate expired at {cert.not_valid_after_utc.isoformat()}"
        )
    if now < cert.not_valid_before_utc:
        raise PemError(
            source, f"certificate not valid until {cert.not_valid_before_utc.isoformat()}"
        )


# === writing ===


def write_atomic(path: Path | str, data: bytes, mode: int, *, exclusive: bool = False) -> None:
    """Replace `path` with `data` in one rename; the file has exactly `mode`.

    The temp file is created 0600 (as ``tempfile.mkstemp`` would: a random name, O_EXCL,
    O_NOFOLLOW; not imported, since its ``shutil`` brings zlib, bz2 and lzma into every
    sidecar, 0.55 MB) and only then chmod-ed to `mode`, so a key never exists with wider
    permissions, whatever the umask.
    `exclusive`: create `path` only if it does not exist (a hard link, which
    fails with FileExistsError), so that of two processes creating the same
    file at once one wins and the other reads the winner's whole file.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.urandom(8).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def key_to_pem(key: SigningKey) -> bytes:
    """Unencrypted PKCS#8 PEM: file permissions, not a passphrase, protect it."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def certificates_to_pem(certs: Iterable[x509.Certificate]) -> bytes:
    """Concatenate certificates as PEM, in the order given."""
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def write_private_key(path: Path | str, key: SigningKey) -> None:
    """Write a private key atomically with mode 0600."""
    write_atomic(path, key_to_pem(key), KEY_MODE)


def write_certificates(path: Path | str, certs: Sequence[x509.Certificate] | bytes) -> None:
    """Write certificates (objects or PEM bytes) atomically with mode 0644."""
    data = certs if isinstance(certs, bytes) else certificates_to_pem(certs)
    write_atomic(path, data, CERT_MODE)


def fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not possible everywhere, hence best effort.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
