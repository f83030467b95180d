"""Start-up of a sidecar under a control plane: what it serves before the stream is up.

Order: the state directory's identity if it has one (the join token is then never read
again, so a used-up token cannot stop a restart), else a join with the token, retried with
backoff over the addresses while the control plane is unreachable; then the last good
snapshot from the state directory, re-validated like a file. With no snapshot yet the sidecar
starts with an empty config and ``/readyz`` says not ready until the first one is applied.

``check`` is ``pake-sidecar check`` for this form: the same checks, no network.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import structlog

from certs.memory_source import MemoryTlsSource, material_from_pem
from certs.pem import PemError

from ..config.load import parse_mesh
from ..config.model import Bootstrap, ControlConfig, MeshConfig
from ..config.reader import ConfigError
from .client import backoff_delay
from .join import JoinFailed, JoinRefused, join
from .origin import ConfigOrigin
from .protocol import JoinToken, ProtocolError
from .state import StateDir, StateError

__all__ = ["Held", "StartupError", "check", "start_joined"]

log = structlog.get_logger("pake.discovery")


class StartupError(Exception):
    """The sidecar cannot start; the text says why and what to do."""


@dataclass(frozen=True)
class Held:
    """What a joined sidecar starts with."""

    source: MemoryTlsSource
    mesh: MeshConfig
    origin: ConfigOrigin | None  # None: no config held yet
    state: StateDir
    node: str


def _read_token(control: ControlConfig) -> JoinToken:
    if control.token_file is None:
        raise StartupError(f"{control.state_dir}: this sidecar has not joined yet and "
                           "control.token_file is not set: create one with pakectl token create")
    try:
        text = control.token_file.read_text()
    except OSError as exc:
        raise StartupError(f"{control.token_file}: cannot read the join token: {exc.strerror or exc}") from None
    try:
        return JoinToken.parse(text)
    except ProtocolError as exc:
        raise StartupError(f"{control.token_file}: {exc}") from None


async def _join(bootstrap: Bootstrap, control: ControlConfig, state: StateDir) -> None:
    token = await asyncio.to_thread(_read_token, control)
    attempt = 0
    while True:
        address = control.addresses[attempt % len(control.addresses)]
        try:
            joined = await join(address, token, bootstrap.service, timeout=control.connect_timeout)
        except JoinRefused as exc:
            raise StartupError(f"join refused by the control plane: {exc} (use a new token from "
                               f"pakectl token create --service {bootstrap.service})") from None
        except JoinFailed as exc:
            delay = backoff_delay(attempt, control.reconnect_max)
            log.warning("join_failed", error=str(exc), retry_in_s=round(delay, 3))
            attempt += 1
            await asyncio.sleep(delay)
            continue
        await asyncio.to_thread(state.save_identity, joined.held)
        log.info("joined", address=joined.address, service=bootstrap.service,
                 trust_domain=joined.trust_domain)
        return


async def start_joined(bootstrap: Bootstrap) -> Held:
    control = bootstrap.control
    assert control is not None
    state = StateDir(control.state_dir)
    try:
        await asyncio.to_thread(state.prepare)
        node: str = (control.node if control.node is not None
                     else await asyncio.to_thread(state.node_id, bootstrap.service))
        held = await asyncio.to_thread(state.load_identity)
    except (OSError, StateError) as exc:
        raise StartupError(f"{control.state_dir}: {exc}") from None
    if held is None:
        await _join(bootstrap, control, state)
        held = await asyncio.to_thread(state.load_identity)
        assert held is not None
    try:
        source = await asyncio.to_thread(MemoryTlsSource, held, state.files)
    except PemError as exc:
        raise StartupError(f"{exc}: the held identity is unusable; to join again, remove "
                           f"{control.state_dir} and give the sidecar a new join token") from None
    trust_domain = source.spiffe_id.trust_domain
    if source.spiffe_id.service != bootstrap.service:
        raise StartupError(f"{state.files.cert}: certificate is for {source.spiffe_id}, this "
                           f"sidecar is service {bootstrap.service!r}")
    mesh, origin = MeshConfig(trust_domain=trust_domain, version=""), None
    try:
        snapshot = await asyncio.to_thread(state.load_snapshot)
        if snapshot is not None:
            mesh = await asyncio.to_thread(parse_mesh, snapshot.mesh, source=str(state.snapshot_path),
                                           version=snapshot.version)
            origin = ConfigOrigin("state_dir", str(state.snapshot_path), snapshot.received_at)
            log.info("snapshot_loaded", version=snapshot.version, received_from=snapshot.origin,
                     received_at=snapshot.received_at)
    except (StateError, ConfigError) as exc:
        # Not fatal: the control plane sends a new one; until then not ready.
        log.error("snapshot_unusable", error=str(exc))
    return Held(source, mesh, origin, state, node)


def check(bootstrap: Bootstrap) -> str:
    """``pake-sidecar check`` for ``control:``: the state directory's identity and snapshot if
    present (validated as at start-up), else the join token. Blocking; raises StartupError
    or ConfigError (whose source is the snapshot file)."""
    control = bootstrap.control
    assert control is not None
    state = StateDir(control.state_dir)
    addresses = ", ".join(f"{h}:{p}" for h, p in control.addresses)
    try:
        held = state.load_identity() if state.path.exists() else None
    except StateError as exc:
        raise StartupError(str(exc)) from None
    if held is None:
        token = _read_token(control)
        return f"control plane {addresses}; not joined yet, join token {token.token_id} for CA {token.ca_fingerprint[:16]}..."
    try:
        material = material_from_pem(held, state.files)
    except PemError as exc:
        raise StartupError(str(exc)) from None
    try:
        snapshot = state.load_snapshot()
    except StateError as exc:
        raise StartupError(str(exc)) from None
    held_config = "no snapshot yet"
    if snapshot is not None:
        mesh = parse_mesh(snapshot.mesh, source=str(state.snapshot_path), version=snapshot.version)
        held_config = f"snapshot version {mesh.version}, {len(mesh.services)} services"
    return (f"control plane {addresses}; joined as {material.spiffe_id} until "
            f"{material.leaf.not_valid_after_utc.isoformat()}; {held_config}")
