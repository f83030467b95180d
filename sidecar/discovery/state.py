"""The state directory of a joined sidecar: key, certificate, bundle, last good snapshot.

Why it exists: traffic must not depend on the control plane being up, only changes do. A
sidecar that starts while the control plane is down serves from these files, and a joined
sidecar never needs its join token again.

Rules: every file is written atomically (temp file, fsync, rename) with mode 0600, in a
directory of mode 0700; every method blocks (file I/O, key checks), so callers on the event
loop use ``asyncio.to_thread``. A renewal writes the new key to ``next-key.pem`` before the
CSR leaves, so a crash between writing the new certificate and the new key is repaired at the
next load (the key that matches the certificate wins).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from certs import pem
from certs.memory_source import PemMaterial
from certs.ssl_context import TlsFiles

__all__ = ["HeldSnapshot", "StateDir", "StateError"]

FILE_MODE = 0o600
DIR_MODE = 0o700
MAX_SNAPSHOT_FILE = 8 * 1024 * 1024  # twice the wire bound: a bigger file is not ours


class StateError(Exception):
    """The state directory is unusable; the text names the file and the problem."""


@dataclass(frozen=True, slots=True)
class HeldSnapshot:
    """The last snapshot this sidecar acked, as received (re-validated when loaded)."""

    version: str
    mesh: dict[str, Any]
    bundle: str | None
    origin: str  # the control-plane address that pushed it
    received_at: str


class StateDir:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.files = TlsFiles(path / "cert.pem", path / "key.pem", path / "bundle.pem")
        self.next_key = path / "next-key.pem"
        self.snapshot_path = path / "snapshot.json"
        self.node_path = path / "node"

    def prepare(self) -> None:
        """Create the directory (0700) if missing; refuse one others can read."""
        self.path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        mode = self.path.stat().st_mode & 0o777
        if mode & 0o077:
            os.chmod(self.path, DIR_MODE)

    def _write(self, path: Path, data: bytes) -> None:
        pem.write_atomic(path, data, FILE_MODE)

    # === node id ===

    def node_id(self, service: str) -> str:
        """A node id made once and kept: stable across restarts, unique per sidecar."""
        with contextlib.suppress(FileNotFoundError):
            node = self.node_path.read_text().strip()
            if node:
                return node
        host = "".join(c if c.isalnum() or c in ".-" else "-" for c in socket.gethostname())[:80]
        node = f"{host or service}-{secrets.token_hex(3)}"
        self._write(self.node_path, node.encode() + b"\n")
        return node

    # === identity ===

    def load_identity(self) -> PemMaterial | None:
        """The held key, certificate and bundle; None when this sidecar never joined.
        StateError when the files are there but unusable (a half-written renewal is repaired)."""
        files = self.files
        if not files.cert.exists() and not files.key.exists():
            return None
        try:
            chain, key, bundle = (pem.read_file(p) for p in (files.cert, files.key, files.bundle))
            leaf = pem.parse_certificates(chain, files.cert)[0]
            try:
                pem.check_key_matches(leaf, pem.parse_private_key(key, files.key), files.cert, files.key)
            except pem.PemError:
                if not self.next_key.exists():
                    raise
                key = pem.read_file(self.next_key)  # a renewal stopped between cert and key
                pem.check_key_matches(leaf, pem.parse_private_key(key, self.next_key),
                                      files.cert, self.next_key)
                self._write(files.key, key)
                self.next_key.unlink(missing_ok=True)
        except pem.PemError as exc:
            raise StateError(str(exc)) from None
        return PemMaterial(chain, key, bundle)

    def save_identity(self, held: PemMaterial) -> None:
        """After a join or a renewal: bundle first, then key, then certificate."""
        self._write(self.files.bundle, held.bundle)
        self._write(self.next_key, held.key)  # the pair is repairable from here on
        self._write(self.files.cert, held.chain)
        self._write(self.files.key, held.key)
        self.next_key.unlink(missing_ok=True)

    def save_next_key(self, key_pem: bytes) -> None:
        self._write(self.next_key, key_pem)

    def save_bundle(self, bundle: bytes) -> None:
        self._write(self.files.bundle, bundle)

    # === snapshot ===

    def load_snapshot(self) -> HeldSnapshot | None:
        """The last good snapshot; None when there is none. StateError when it is unreadable."""
        try:
            size = self.snapshot_path.stat().st_size
        except FileNotFoundError:
            return None
        if size > MAX_SNAPSHOT_FILE:
            raise StateError(f"{self.snapshot_path}: {size} bytes, more than {MAX_SNAPSHOT_FILE}")
        try:
            body = json.loads(self.snapshot_path.read_bytes())
            return HeldSnapshot(version=str(body["version"]), mesh=dict(body["mesh"]),
                                bundle=body.get("bundle"), origin=str(body["origin"]),
                                received_at=str(body["received_at"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StateError(f"{self.snapshot_path}: not a snapshot this sidecar wrote ({exc})") from None

    def save_snapshot(self, snapshot: HeldSnapshot) -> None:
        body = {"version": snapshot.version, "mesh": snapshot.mesh, "bundle": snapshot.bundle,
                "origin": snapshot.origin, "received_at": snapshot.received_at}
        self._write(self.snapshot_path, json.dumps(body, separators=(",", ":")).encode())
