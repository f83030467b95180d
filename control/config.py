"""Applied mesh configs: validate, apply as a new version, keep every version with who and when.

Store keys: ``config/current`` (the running version) and ``config/history/<version:08d>``.
Validation is the sidecar's own ``parse_mesh`` on the whole mesh and on every per-sidecar
subset, so whatever is applied is something every sidecar accepts. Applies are serialised
in this process (a lock) and across replicas by a revision check on ``config/current``:
two concurrent applies never lose one (each gets its own version), and a caller that
demands the version it looked at (``expect_version``) gets ``Conflict`` if it moved.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from control.snapshots import build_subset, needed_services
from control.store import Conflict, Store
from sidecar.config.load import parse_mesh
from sidecar.config.reader import ConfigError

__all__ = ["CURRENT", "AppliedConfig", "ConfigService", "Conflict", "load_applied"]

CURRENT = "config/current"
HISTORY = "config/history/"


@dataclass(frozen=True, slots=True)
class AppliedConfig:
    version: int
    mesh: dict[str, Any]
    by: str
    at: str
    rollback_of: int | None = None

    def summary(self) -> dict[str, Any]:
        return {"version": self.version, "by": self.by, "at": self.at,
                "rollback_of": self.rollback_of,
                "services": sorted((self.mesh.get("services") or {}))}


def validate(mesh: Any, trust_domain: str) -> list[str]:
    """Every problem, path-qualified; [] when the mesh (and every subset) is valid."""
    try:
        parse_mesh(mesh, source=None, version="check")
    except ConfigError as exc:
        return list(exc.problems)
    problems = []
    if mesh.get("trust_domain", "pake.local") != trust_domain:
        problems.append(f"trust_domain: must be {trust_domain!r} (the control plane's CA), "
                        f"got {mesh.get('trust_domain')!r}")
    for name in sorted(mesh.get("services") or {}):
        if needed_services(mesh, name) is None:
            continue  # gets the whole mesh, just checked
        try:
            parse_mesh(build_subset(mesh, name, {}), version="check")
        except ConfigError as exc:
            problems.extend(f"(snapshot for {name}) {p}" for p in exc.problems)
    return problems


class ConfigService:
    def __init__(self, store: Store, trust_domain: str) -> None:
        self.store = store
        self.trust_domain = trust_domain
        self._lock = asyncio.Lock()

    async def current(self) -> AppliedConfig | None:
        entry = await self.store.get(CURRENT)
        return None if entry is None else _load(entry.value)

    async def get(self, version: int) -> AppliedConfig | None:
        entry = await self.store.get(f"{HISTORY}{version:08d}")
        return None if entry is None else _load(entry.value)

    async def history(self) -> list[AppliedConfig]:
        return [_load(e.value) for e in await self.store.list(HISTORY)]

    async def validate(self, mesh: Any) -> list[str]:
        # parse_mesh is CPU only, but a large mesh (schemas, many routes) takes milliseconds.
        return await asyncio.to_thread(validate, mesh, self.trust_domain)

    async def apply(self, mesh: Any, by: str, *, expect_version: int | None = None,
                    rollback_of: int | None = None, now: datetime | None = None) -> AppliedConfig:
        """Apply as the next version. Raises ConfigError (invalid) or Conflict (moved)."""
        problems = await self.validate(mesh)
        if problems:
            raise ConfigError(problems)
        async with self._lock:
            entry = await self.store.get(CURRENT)
            current = None if entry is None else _load(entry.value)
            held = 0 if current is None else current.version
            if expect_version is not None and expect_version != held:
                raise Conflict(f"the running config is version {held}, not {expect_version}: "
                               "someone applied meanwhile; look again (--dry-run) and re-apply")
            applied = AppliedConfig(
                version=held + 1, mesh=mesh, by=by,
                at=(now or datetime.now(UTC)).isoformat(timespec="seconds"),
                rollback_of=rollback_of,
            )
            data = _dump(applied)
            # current first: the revision check there decides which replica's apply wins.
            try:
                await self.store.put(CURRENT, data, expect=0 if entry is None else entry.revision)
            except Conflict:
                raise Conflict(f"another apply won the race for version {applied.version} "
                               "(through another replica): nothing was applied; look again "
                               "(--dry-run) and re-apply") from None
            await self.store.put(f"{HISTORY}{applied.version:08d}", data)
            return applied


def _dump(applied: AppliedConfig) -> bytes:
    return json.dumps({"version": applied.version, "mesh": applied.mesh, "by": applied.by,
                       "at": applied.at, "rollback_of": applied.rollback_of}).encode()


def load_applied(data: bytes) -> AppliedConfig:
    """An ``AppliedConfig`` from its store record (what the store watch reports)."""
    return _load(data)


def _load(data: bytes) -> AppliedConfig:
    raw = json.loads(data)
    return AppliedConfig(version=raw["version"], mesh=raw["mesh"], by=raw["by"], at=raw["at"],
                         rollback_of=raw.get("rollback_of"))
