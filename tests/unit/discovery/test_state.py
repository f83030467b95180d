"""The joined sidecar's state directory: private files, atomic writes, a repairable renewal."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from certs.memory_source import PemMaterial
from sidecar.discovery.client import backoff_delay
from sidecar.discovery.state import HeldSnapshot, StateDir, StateError
from tests.helpers.pki import make_test_pki


def material(root: Path, name: str) -> PemMaterial:
    pki = make_test_pki(root, services=())
    files = pki.issue("orders", out_dir=root / name)
    return PemMaterial(files.cert.read_bytes(), files.key.read_bytes(), files.bundle.read_bytes())


def test_identity_and_snapshot_are_private_and_round_trip(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    state.prepare()
    assert state.load_identity() is None and state.load_snapshot() is None
    held = material(tmp_path / "pki", "a")
    state.save_identity(held)
    snapshot = HeldSnapshot("3.abc", {"services": {}}, None, "127.0.0.1:15010", "2025-01-01T00:00:00Z")
    state.save_snapshot(snapshot)
    assert state.load_identity() == held and state.load_snapshot() == snapshot
    assert stat.S_IMODE(state.path.stat().st_mode) == 0o700
    for path in state.path.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert state.node_id("orders") == state.node_id("orders")  # made once, kept


def test_a_renewal_cut_between_certificate_and_key_is_repaired(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    state.prepare()
    old = material(tmp_path / "pki", "old")
    state.save_identity(old)
    new = material(tmp_path / "pki2", "new")
    state.save_next_key(new.key)  # written before the CSR left
    (state.files.cert).write_bytes(new.chain)  # the process died here: new cert, old key
    assert state.load_identity() == PemMaterial(new.chain, new.key, old.bundle)
    assert state.files.key.read_bytes() == new.key and not state.next_key.exists()


def test_a_snapshot_file_that_is_not_ours_names_the_file(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    state.prepare()
    state.snapshot_path.write_text("{not json")
    with pytest.raises(StateError, match=str(state.snapshot_path)):
        state.load_snapshot()


def test_backoff_is_jittered_exponential_and_capped() -> None:
    assert [backoff_delay(n, 5.0, rand=lambda: 1.0) for n in range(8)] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    assert backoff_delay(3, 5.0, rand=lambda: 0.5) == 0.4
    assert backoff_delay(50, 5.0, rand=lambda: 0.0) == 0.01  # never a busy loop
