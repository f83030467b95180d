"""What a reload of sidecar.yaml applies and what waits for a restart (pure)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from sidecar.config.load import reloaded_bootstrap
from sidecar.config.log_levels import LogLevels
from sidecar.config.model import Bootstrap, Limits, ListenerConfig


def bootstrap(**changes: object) -> Bootstrap:
    base = Bootstrap(source=Path("/etc/pake/sidecar.yaml"), service="orders", mode="sidecar",
                     app=("127.0.0.1", 8080), mesh_path=Path("/etc/pake/mesh.yaml"),
                     listeners=(ListenerConfig(name="outbound", address=("127.0.0.1", 15001)),
                                ListenerConfig(name="inbound", address=("0.0.0.0", 15006), tls=True)))
    return replace(base, **changes)  # type: ignore[arg-type]


def test_live_changes_apply_and_bound_ones_are_listed() -> None:
    running = bootstrap()
    new = bootstrap(app=("127.0.0.1", 9090), limits=Limits(max_header_count=5), log_level=LogLevels("debug"),
                    listeners=(ListenerConfig(name="outbound", address=("127.0.0.1", 15001)),
                               ListenerConfig(name="inbound", address=("0.0.0.0", 15007), tls=False),
                               ListenerConfig(name="admin", address=("127.0.0.1", 15000))))
    kept, pending = reloaded_bootstrap(running, new)
    assert kept.app == ("127.0.0.1", 9090) and kept.limits.max_header_count == 5
    assert kept.listeners == running.listeners and kept.log_level == LogLevels("debug")  # live
    assert pending == ["listeners.admin: (none) -> 127.0.0.1:15000",
                       "listeners.inbound: 0.0.0.0:15006 -> 0.0.0.0:15007",
                       "listeners.inbound.tls: true -> false"]


def test_nothing_pending_when_only_live_settings_change() -> None:
    running = bootstrap()
    kept, pending = reloaded_bootstrap(running, bootstrap(limits=Limits(max_pipelined=4)))
    assert pending == [] and kept.limits.max_pipelined == 4
