"""`pakectl certs rotate --ca`: replace the CA's root with an overlap, so no connection fails.

Phases, each ended by every registered sidecar (mesh-wide: the registry view, fed by every
replica) having acked it:
  1. ``bundle``:  the new root joins the bundle (signer unchanged) -> every sidecar trusts both;
  2. ``reissue``: the new root signs -> every replica re-issues its listen certificate and asks
     its sidecars for CSRs -> every sidecar holds a certificate from the new root;
  3. ``trim``:    the old root leaves the bundle -> every sidecar trusts only the new root.
The rotation's state is the store record ``ca/rotation`` (the new CA sealed like the CA
itself, see control/ca_state.py, and the phase reached), written before each step, so a run
that is interrupted (the CLI or a replica killed) continues where it stopped when it is run
again: each phase first makes ``ca/authority`` what the phase needs (idempotent), then waits.
Pure orchestration: the pushes and renewals themselves follow from the store watch
(control/server.py), on every replica alike.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from cryptography import x509

from certs import pem
from certs.ca import CertificateAuthority
from control.ca_service import CAService
from control.ca_state import (
    AUTHORITY_KEY,
    ROTATION_KEY,
    decode_authority,
    encode_authority,
    new_root,
    root_fingerprint,
)
from control.registry import Registration, Registry
from control.store import Conflict, Store, StoreError

__all__ = ["PHASES", "CARotation", "RotationFailed", "describe_error"]

log = structlog.get_logger("control.rotation")

PHASES = ("bundle", "reissue", "trim")
Progress = Callable[[dict[str, Any]], Awaitable[None]]
_RETRIES = 8


class RotationFailed(Exception):
    """The rotation cannot go on (the text says why); its state stays for a re-run."""


@dataclass(frozen=True, slots=True)
class _Record:
    phase: str
    new: bytes  # an encoded authority record: the new root, its sealed key
    old_roots: str  # PEM
    started_at: str
    by: str

    def dump(self) -> bytes:
        return json.dumps({"phase": self.phase, "new": json.loads(self.new),
                           "old_roots": self.old_roots, "started_at": self.started_at,
                           "by": self.by}).encode()

    @classmethod
    def load(cls, data: bytes) -> _Record:
        raw = json.loads(data)
        if raw.get("phase") not in PHASES:
            raise RotationFailed(f"{ROTATION_KEY}: unknown phase {raw.get('phase')!r}")
        return cls(raw["phase"], json.dumps(raw["new"]).encode(), raw["old_roots"],
                   raw["started_at"], raw.get("by", ""))


class CARotation:
    def __init__(self, store: Store, ca: CAService, registry: Registry, store_key: bytes,
                 renew_lagging: Callable[[str], int]) -> None:
        self.store = store
        self.ca = ca
        self.registry = registry
        self._store_key = store_key
        self._renew_lagging = renew_lagging
        self._lock = asyncio.Lock()

    async def run(self, progress: Progress, *, timeout: float, by: str) -> dict[str, Any]:
        """Start a rotation, or continue the one in the store; returns the final summary.
        ``timeout`` bounds each phase's wait; on timeout the rotation stops (resumable)."""
        async with self._lock:
            record, resumed = await self._record(by)
            new = decode_authority(record.new, self._store_key)
            new_fp = root_fingerprint(new.certificate)
            old = pem.parse_certificates(record.old_roots.encode(), ROTATION_KEY)
            await progress({"event": "start", "resumed": resumed, "phase": record.phase,
                            "new_fingerprint": new_fp,
                            "old_fingerprints": [root_fingerprint(c) for c in old]})
            for step, phase in enumerate(PHASES, 1):
                if PHASES.index(phase) < PHASES.index(record.phase):
                    continue
                await self._ensure_authority(phase, new, old)
                if phase == "reissue":
                    # Nudge every replica (they watch the record) and this one directly.
                    record = await self._put_record(_Record(phase, record.new, record.old_roots,
                                                            record.started_at, record.by))
                    self._renew_lagging("ca rotation")
                waiting = await self._wait(phase, new_fp, progress, step, timeout)
                if waiting:
                    await progress({"event": "timeout", "phase": phase, "step": step,
                                    "waiting": waiting})
                    return {"ok": False, "phase": phase, "new_fingerprint": new_fp,
                            "waiting": waiting}
                if phase != PHASES[-1]:
                    record = await self._put_record(_Record(PHASES[step], record.new,
                                                            record.old_roots, record.started_at,
                                                            record.by))
            await self.store.delete(ROTATION_KEY)
            log.info("ca_rotated", fingerprint=new_fp)
            return {"ok": True, "phase": "done", "new_fingerprint": new_fp, "waiting": []}

    async def _record(self, by: str) -> tuple[_Record, bool]:
        entry = await self.store.get(ROTATION_KEY)
        if entry is not None:
            return _Record.load(entry.value), True
        current = await self.store.get(AUTHORITY_KEY)
        if current is None:
            raise RotationFailed(f"{AUTHORITY_KEY}: no CA in the store")
        old = decode_authority(current.value, self._store_key)
        fresh = await asyncio.to_thread(new_root, old.trust_domain)
        record = _Record("bundle", encode_authority(fresh, self._store_key),
                         pem.certificates_to_pem(old.roots).decode("ascii"),
                         datetime.now(UTC).isoformat(timespec="seconds"), by)
        try:
            await self.store.put(ROTATION_KEY, record.dump(), expect=0)
        except Conflict:  # another run started one just now: continue that one
            entry = await self.store.get(ROTATION_KEY)
            if entry is None:
                raise RotationFailed("a concurrent rotation started and ended; run again") from None
            return _Record.load(entry.value), True
        log.info("ca_rotation_started", fingerprint=root_fingerprint(fresh.certificate), by=by)
        return record, False

    async def _put_record(self, record: _Record) -> _Record:
        await self.store.put(ROTATION_KEY, record.dump())
        return record

    async def _ensure_authority(self, phase: str, new: CertificateAuthority,
                                old: list[x509.Certificate]) -> None:
        """Make ``ca/authority`` what ``phase`` needs: who signs, which roots are trusted."""
        for _ in range(_RETRIES):
            entry = await self.store.get(AUTHORITY_KEY)
            if entry is None:
                raise RotationFailed(f"{AUTHORITY_KEY}: no CA in the store")
            current = decode_authority(entry.value, self._store_key)
            if phase == "bundle":
                signer = current if current.certificate not in new.roots else None
                if signer is None:
                    raise RotationFailed("the new root already signs, yet the rotation is in "
                                         "phase 'bundle'")
                roots = (*old, new.certificate)
            elif phase == "reissue":
                signer, roots = new, (*old, new.certificate)
            else:
                signer, roots = new, (new.certificate,)
            wanted = CertificateAuthority(signer.trust_domain, signer.certificate, signer.key,
                                          parents=signer.parents, roots=tuple(roots))
            if (current.certificate, current.roots) == (wanted.certificate, wanted.roots):
                return
            try:
                await self.store.put(AUTHORITY_KEY, encode_authority(wanted, self._store_key),
                                     expect=entry.revision)
                log.info("ca_rotation_phase", phase=phase, roots=len(wanted.roots))
                return
            except Conflict:
                continue
        raise RotationFailed(f"{AUTHORITY_KEY} keeps changing under the rotation; run again")

    async def _wait(self, phase: str, new_fp: str, progress: Progress, step: int,
                    timeout: float) -> list[str]:
        """Wait until every registration is done with ``phase``; the ones still waiting on
        timeout ([] when all are done). Reports the counts as they change."""
        def done(reg: Registration) -> bool:
            if phase == "bundle":
                return new_fp in reg.roots
            if phase == "reissue":
                return reg.cert_root == new_fp
            return reg.roots == (new_fp,)

        last: tuple[int, int] | None = None

        async def report() -> None:
            nonlocal last
            regs = self.registry.registrations()
            counts = (sum(done(r) for r in regs), len(regs))
            if counts != last:
                last = counts
                await progress({"event": "phase", "phase": phase, "step": step,
                                "of": len(PHASES), "done": counts[0], "total": counts[1]})

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            await report()
            regs = self.registry.registrations()
            if all(done(r) for r in regs):
                return []
            remaining = deadline - loop.time()
            if remaining <= 0:
                return [f"{r.service}/{r.node}" for r in regs if not done(r)]
            if phase == "reissue":
                # Ask the laggards again (renew_lagging spaces its asks): the nudge at the start
                # of the phase is skipped for a sidecar asked moments before (a `certs rotate`
                # just now), and a Renew can be lost with a stream; nothing else asks again.
                self._renew_lagging("ca rotation")
            try:
                # Wake when the counts change; at least every second, so that a CLI that
                # went away is noticed (the progress write fails) and the run stops.
                await self.registry.wait_until(
                    lambda rs: (sum(done(r) for r in rs), len(rs)) != last, min(1.0, remaining))
            except TimeoutError:
                await progress({"event": "waiting", "phase": phase})


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, (RotationFailed, StoreError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
