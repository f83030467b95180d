"""Where the config in force came from, and when: shown by admin ``/config``.

Stdlib only, like the rest of ``sidecar.discovery``'s shared parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

__all__ = ["ConfigOrigin", "now_iso"]

OriginKind = Literal["file", "control", "state_dir"]


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True, slots=True)
class ConfigOrigin:
    """``file`` (a mesh.yaml path), ``control`` (the control-plane address that pushed it) or
    ``state_dir`` (the last good snapshot kept on disk, served while the control plane is away);
    ``at`` is when this sidecar received it (for ``state_dir``: when it was first received)."""

    kind: OriginKind
    where: str
    at: str

    def info(self) -> dict[str, Any]:
        return {"from": self.kind, "where": self.where, "at": self.at}
