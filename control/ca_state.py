"""The CA as the replicas share it: one store record, its key sealed with the store key.

Why in the store: replicas on several machines share nothing but the store, and a CA rotation
must change the signer on every replica at once (a store watch does that). Why sealed: etcd
(or a backup of its data) is read by more people than a 0600 file, so the CA key is kept
AES-256-GCM-encrypted under the *store key*, a 32-byte secret in a 0600 file that every
replica holds (``--store-key-file``, default ``<state-dir>/store.key``; copy it to each
replica like any other secret). The store thus never holds the CA key in the clear, and a
replica without the right store key refuses to start with a message that says so. Records
are never logged; nothing here has a ``__repr__`` that shows a key.

Record ``ca/authority``: ``{"trust_domain": ..., "signer": {"chain": PEM, "key": sealed}, "roots": PEM}``:
the signer's certificate (then any intermediates) and the trust bundle, which holds two
roots while a rotation overlaps them. ``ca/rotation`` holds a rotation in progress
(control/rotation.py).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding

from certs import pem, profile
from certs.ca import CLOCK_SKEW, ROOT_PATH_LENGTH, ROOT_VALIDITY, CertificateAuthority
from sidecar.discovery.protocol import fingerprint_der

__all__ = [
    "AUTHORITY_KEY",
    "ROTATION_KEY",
    "CAStateError",
    "decode_authority",
    "encode_authority",
    "load_store_key",
    "new_root",
    "root_fingerprint",
    "seal_key",
    "unseal_key",
]

AUTHORITY_KEY = "ca/authority"
ROTATION_KEY = "ca/rotation"
_STORE_KEY_BYTES = 32
_AAD = b"pake-mesh ca key v1"


class CAStateError(Exception):
    """The CA record cannot be used (wrong store key, damaged record): the text says which."""


def load_store_key(path: Path, *, create: bool) -> bytes:
    """The 32-byte store key in ``path`` (hex); created 0600 when missing and ``create``."""
    if not path.exists():
        if not create:
            raise CAStateError(f"{path}: no store key here (copy the first replica's key file)")
        # Replicas started at once on one shared key file: the first key written is everyone's
        # (replacing it would leave a replica holding a key no longer in the file).
        with contextlib.suppress(FileExistsError):
            pem.write_atomic(path, secrets.token_hex(_STORE_KEY_BYTES).encode() + b"\n", 0o600,
                             exclusive=True)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise CAStateError(f"{path}: the store key must be readable by its owner only "
                           f"(mode {mode:04o}; chmod 600 it)")
    text = path.read_text().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != _STORE_KEY_BYTES:
        raise CAStateError(f"{path}: not a store key (expected {_STORE_KEY_BYTES * 2} hex digits)")
    return key


def seal_key(key: ec.EllipticCurvePrivateKey, store_key: bytes) -> str:
    der = key.private_bytes(Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    nonce = os.urandom(12)
    return base64.b64encode(nonce + AESGCM(store_key).encrypt(nonce, der, _AAD)).decode("ascii")


def unseal_key(sealed: str, store_key: bytes) -> ec.EllipticCurvePrivateKey:
    try:
        raw = base64.b64decode(sealed, validate=True)
        der = AESGCM(store_key).decrypt(raw[:12], raw[12:], _AAD)
    except (InvalidTag, ValueError):
        raise CAStateError("the CA key in the store does not open with this replica's store key: "
                           "give every replica the same --store-key-file") from None
    key = serialization.load_der_private_key(der, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CAStateError("the CA key in the store is not an EC key")
    return key


def root_fingerprint(cert: x509.Certificate) -> str:
    return fingerprint_der(cert.public_bytes(Encoding.DER))


def encode_authority(ca: CertificateAuthority, store_key: bytes) -> bytes:
    return json.dumps({
        "trust_domain": ca.trust_domain,
        "signer": {"chain": pem.certificates_to_pem([ca.certificate, *ca.parents]).decode("ascii"),
                   "key": seal_key(ca.key, store_key)},
        "roots": pem.certificates_to_pem(ca.roots).decode("ascii"),
    }).encode()


def decode_authority(data: bytes, store_key: bytes) -> CertificateAuthority:
    try:
        raw = json.loads(data)
        trust_domain = str(raw["trust_domain"])
        chain = pem.parse_certificates(raw["signer"]["chain"].encode(), AUTHORITY_KEY)
        roots = pem.parse_certificates(raw["roots"].encode(), AUTHORITY_KEY)
        sealed = raw["signer"]["key"]
    except (ValueError, KeyError, TypeError, pem.PemError) as exc:
        raise CAStateError(f"{AUTHORITY_KEY}: damaged record: {exc}") from None
    key = unseal_key(sealed, store_key)
    return CertificateAuthority(trust_domain, chain[0], key, parents=tuple(chain[1:]),
                                roots=tuple(roots))


def new_root(trust_domain: str, validity: timedelta = ROOT_VALIDITY,
             now: datetime | None = None) -> CertificateAuthority:
    """A fresh self-signed root, in memory only (its key goes to the store sealed).

    Its subject names when it was made, so two roots overlapping in a bundle are told apart by
    name too, not only by key identifier."""
    now = now or datetime.now(UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = profile.ca_name(trust_domain, f"Root {now:%Y%m%dT%H%M%S}")
    cert = profile.ca_builder(
        subject=name, issuer=name, public_key=key.public_key(),
        issuer_public_key=key.public_key(), trust_domain=trust_domain,
        not_before=now - CLOCK_SKEW, not_after=now + validity, path_length=ROOT_PATH_LENGTH,
    ).sign(key, hashes.SHA256())
    return CertificateAuthority(trust_domain, cert, key, parents=(), roots=(cert,))
