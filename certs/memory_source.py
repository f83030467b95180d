"""A TlsContextSource fed from bytes in memory, updated in place: the control-plane mode.

A joined sidecar gets its certificate, key and bundle over the wire, not from files that an
operator replaces. ``MemoryTlsSource`` validates PEM bytes with the same checks as
``load_material`` (key matches leaf, validity, exactly one SPIFFE URI SAN, CA-only bundle),
builds both contexts and swaps them in with one assignment: handshakes started later use the
new identity, connections already open keep theirs, so a renewal drops nothing.

Blocking: building a context loads the chain and key through OpenSSL, which in Python reads
them only from a file (``load_identity``: an anonymous memory file where Linux has one, so
the key never reaches a file system). Call ``update``/``update_bundle`` off the event loop.
``files`` names where the caller persists the material (shown by ``info()``); this source
never reads them.
"""

from __future__ import annotations

import hashlib
import ssl
from dataclasses import dataclass, field
from typing import Any

from certs import pem
from certs.bundle import TrustBundle
from certs.ssl_context import (
    Side,
    TlsMaterial,
    TlsPaths,
    UtcNow,
    _configure,
    _Generation,
    _own_identity,
    _utcnow,
    load_identity,
)
from certs.ssl_context import TlsContextSource

__all__ = ["MemoryTlsSource", "PemMaterial", "material_from_pem"]


@dataclass(frozen=True)
class PemMaterial:
    """The three PEM texts of an identity, as held in memory (the key never in a repr)."""

    chain: bytes
    key: bytes = field(repr=False)
    bundle: bytes


def material_from_pem(held: PemMaterial, files: TlsPaths, now: Any = None) -> TlsMaterial:
    """Validate PEM bytes like ``load_material`` validates files; PemError names ``files``'
    path of the part that is wrong (where the caller keeps that part)."""
    now = _utcnow() if now is None else now
    chain = pem.parse_certificates(held.chain, files.cert)
    key = pem.parse_private_key(held.key, files.key)
    pem.check_key_matches(chain[0], key, files.cert, files.key)
    pem.check_validity(chain[0], files.cert, now)
    spiffe_id = _own_identity(chain[0], files.cert)
    bundle = TrustBundle.from_pem(held.bundle, files.bundle)
    digest = hashlib.sha256(
        b"\0".join(hashlib.sha256(b).digest() for b in (held.chain, held.key, held.bundle))
    ).digest()
    return TlsMaterial(files, tuple(chain), bundle, spiffe_id, digest)


def _context(side: Side, material: TlsMaterial, held: PemMaterial) -> ssl.SSLContext:
    ctx = _configure(side, material)
    try:
        load_identity(ctx, material, held.key)
    except ssl.SSLError as exc:  # not reachable after material_from_pem's checks
        raise pem.PemError(material.files.cert,
                           f"OpenSSL refused the certificate/key pair: {exc.reason or exc}") from None
    return ctx


@dataclass(frozen=True)
class _MemoryGeneration(_Generation):
    held: PemMaterial = field(repr=False, default=PemMaterial(b"", b"", b""))


class MemoryTlsSource(TlsContextSource):
    """The current contexts of a workload whose identity arrives in memory (see module doc)."""

    def __init__(self, held: PemMaterial, files: TlsPaths, *, clock: UtcNow = _utcnow) -> None:
        self.files = files
        self._clock = clock
        self._current: _MemoryGeneration = self._generation(held)

    def _generation(self, held: PemMaterial) -> _MemoryGeneration:
        material = material_from_pem(held, self.files, self._clock())
        return _MemoryGeneration(material, _context("server", material, held),
                                 _context("client", material, held), held)

    @property
    def held(self) -> PemMaterial:
        """The PEM bytes in force (to persist them, or to keep the key with a new bundle)."""
        return self._current.held

    def update(self, held: PemMaterial) -> bool:
        """Validate and swap in a new identity (blocking). False when it is the one in force;
        PemError when unusable, and the current contexts stay."""
        generation = self._generation(held)
        if generation.material.digest == self._current.material.digest:
            return False
        self._current = generation  # one assignment: the next handshake uses it
        return True

    def update_bundle(self, bundle: bytes) -> bool:
        """The same certificate and key with a new trust bundle (a CA rotation's roots)."""
        current = self._current.held
        return self.update(PemMaterial(current.chain, current.key, bundle))

    def reload(self) -> bool:
        """Nothing to re-read: updates come through ``update``."""
        return False

    def server_dispatcher(self) -> ssl.SSLContext:
        """As ``TlsContextSource.server_dispatcher``, built from the bytes in force."""
        current = self._current
        ctx = _context("server", current.material, current.held)
        ctx.sni_callback = self._select_server
        return ctx
