"""The CA record in the store: its key sealed with the store key, never in the clear."""

from __future__ import annotations

from pathlib import Path

import pytest

from control.ca_state import (
    CAStateError,
    decode_authority,
    encode_authority,
    load_store_key,
    new_root,
)


def test_the_ca_key_is_sealed_and_opens_only_with_the_same_store_key(tmp_path: Path) -> None:
    key = load_store_key(tmp_path / "store.key", create=True)
    assert (tmp_path / "store.key").stat().st_mode & 0o777 == 0o600
    assert load_store_key(tmp_path / "store.key", create=False) == key
    ca = new_root("pake.local")
    record = encode_authority(ca, key)
    assert b"PRIVATE KEY" not in record
    back = decode_authority(record, key)
    assert back.certificate == ca.certificate and back.roots == ca.roots
    assert back.key.private_numbers() == ca.key.private_numbers()
    other = load_store_key(tmp_path / "other.key", create=True)
    with pytest.raises(CAStateError, match="give every replica the same --store-key-file"):
        decode_authority(record, other)


def test_a_store_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "store.key"
    load_store_key(path, create=True)
    path.chmod(0o644)
    with pytest.raises(CAStateError, match=r"store.key: the store key must be readable by its owner only \(mode 0644"):
        load_store_key(path, create=False)
    with pytest.raises(CAStateError, match="no store key here"):
        load_store_key(tmp_path / "missing.key", create=False)
