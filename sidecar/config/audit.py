"""The bootstrap's ``audit`` section: where the sidecar's own audit records go.

The sink is the sidecar's (``sidecar.yaml``), not the mesh's::

    audit: {path: stdout, max_size: 10MiB, keep: 5, queue: 10000, warn_interval: 10s}
"""

from __future__ import annotations

from dataclasses import dataclass

from .reader import Fields

__all__ = ["AuditConfig", "parse_audit"]

@dataclass(frozen=True, slots=True)
class AuditConfig:
    path: str = "stdout"  # "stdout" or a file path
    max_size: int = 10 * 1024 * 1024  # rotate the file past this
    keep: int = 5  # rotated files kept: audit.log.1 .. audit.log.<keep>
    queue: int = 10_000  # records waiting for the writer; more are dropped and counted
    warn_interval: float = 10.0  # at most one "dropping audit records" warning per this



def parse_audit(node: Fields) -> AuditConfig:
    """The bootstrap's ``audit``."""
    d = AuditConfig()
    config = AuditConfig(
        path=node.str("path", d.path),
        max_size=node.size("max_size", d.max_size),
        keep=node.int("keep", d.keep, min=0, max=1000),
        queue=node.int("queue", d.queue, min=1, max=10_000_000),
        warn_interval=node.duration("warn_interval", d.warn_interval),
    )
    if config.max_size < 4096:
        node.error("max_size", "must be at least 4KiB")
    node.done()
    return config
