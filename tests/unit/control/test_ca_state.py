"""The CA record in the store: its key sealed with the store key, never in the clear."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
from pathlib import Path
from typing import Any

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


def test_replicas_creating_one_shared_store_key_at_once_all_get_the_same_key(tmp_path: Path) -> None:
    # Two replicas started together on a shared key file: each must end up with the key the
    # file holds, or one seals the CA with a key the other cannot open (seen in CI).
    for attempt in range(20):
        path = tmp_path / f"store-{attempt}.key"
        start = multiprocessing.get_context("fork").Barrier(6)
        with concurrent.futures.ProcessPoolExecutor(
                6, mp_context=multiprocessing.get_context("fork"),
                initializer=_share_barrier, initargs=(start,)) as pool:
            keys = list(pool.map(_load_after_barrier, [path] * 6))
        assert set(keys) == {load_store_key(path, create=False)}, attempt
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temp file left


_barrier: list[Any] = []


def _share_barrier(barrier: Any) -> None:
    _barrier.append(barrier)


def _load_after_barrier(path: Path) -> bytes:
    _barrier[0].wait()
    return load_store_key(path, create=True)
