"""Opening a replica's shared state: the store (directory or etcd) and the CA in it.

``--store`` absent: the directory store under ``<state-dir>/store`` (one replica).
``--store etcd://h1:2379,h2:2379``: etcd, keys under ``--store-prefix``; registrations are
ephemeral (this replica's lease). Either way the CA lives in the store (control/ca_state.py),
imported at first start from ``<state-dir>/ca`` (the ``pakectl ca init`` layout; created
when missing). With etcd, the first replica to start imports its CA and the others use that
one: the import is a put with ``expect=0``, so two replicas starting together agree.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import structlog

from certs.ca import CertificateAuthority
from control.ca_service import CAService
from control.ca_state import AUTHORITY_KEY, CAStateError, decode_authority, encode_authority
from control.store import Conflict, Store
from control.store_dir import DirectoryStore
from control.store_etcd import EtcdStore

__all__ = ["StoreUrlError", "load_authority", "open_store", "parse_store_url"]

log = structlog.get_logger("pake.control.replica")


class StoreUrlError(ValueError):
    """A ``--store`` value that is not understood; the text names it."""


def parse_store_url(text: str) -> tuple[str, ...]:
    """``etcd://host:port[,host:port...]`` -> the etcd client URLs."""
    scheme, sep, rest = text.partition("://")
    if not sep or scheme != "etcd" or not rest:
        raise StoreUrlError(f"--store {text!r}: expected etcd://host:port[,host:port...]")
    urls = []
    for part in rest.split(","):
        host, colon, port = part.strip().rstrip("/").rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise StoreUrlError(f"--store {text!r}: {part!r} is not host:port")
        urls.append(f"http://{host}:{port}")
    return tuple(urls)


async def open_store(state_dir: Path, etcd: Sequence[str], *, prefix: str,
                     lease_ttl: int) -> Store:
    if not etcd:
        return await DirectoryStore.open(state_dir / "store")
    store = await EtcdStore.connect(etcd, prefix=prefix, lease_ttl=lease_ttl)
    log.info("store_etcd", endpoints=list(etcd), prefix=prefix, lease_ttl_s=lease_ttl)
    return store


async def load_authority(store: Store, ca_dir: Path, store_key: bytes,
                         workload_ttl: timedelta) -> CertificateAuthority:
    """The CA in the store; the one in ``ca_dir`` (made if missing) imported when none is."""
    entry = await store.get(AUTHORITY_KEY)
    if entry is None:
        local, created = await asyncio.to_thread(CAService.load_or_init, ca_dir, workload_ttl)
        if created:
            log.info("ca_created", state_dir=str(ca_dir), trust_domain=local.trust_domain)
        try:
            await store.put(AUTHORITY_KEY, encode_authority(local.ca, store_key), expect=0)
            log.info("ca_imported", source=str(ca_dir), fingerprint=local.fingerprint)
            return local.ca
        except Conflict:
            entry = await store.get(AUTHORITY_KEY)  # another replica imported its CA first
            if entry is None:
                raise CAStateError(f"{AUTHORITY_KEY}: written by another replica, then deleted") from None
    return decode_authority(entry.value, store_key)
