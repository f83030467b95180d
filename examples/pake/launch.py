"""Bring the demo mesh up under one control plane, and down again: ``async with Mesh(...)``.

Order: ``pakectl serve`` (its state, the CA, tokens and applied versions, kept in
``--state-dir``, ``.pake/demo/`` of the checkout by default), ``mesh.yaml`` applied (only
when it differs from the running version, so a restarted demo does not pile up versions),
every sidecar at once, each joined with a one-use token (or, restarted, with the identity
its state directory holds), then the apps (on sockets bound here first, so each sidecar knew
its app's port), and finally a wait until every sidecar holds its latest snapshot. Every
child's output goes to ``<state-dir>/logs/<name>.log``; the sidecars' audit records are also
shipped to the ``audit`` service (``shipper.py``). Leaving the block stops everything in reverse order.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from examples.pake.shipper import AuditShipper
from sidecar.config.load import parse_yaml
from examples.runner import (
    Child, ControlPlane, DemoError, LineHook, Ready, apps_ready, identity_usable, python, serving_ready,
    shift_address, sidecar_ready, until,
)

__all__ = ["DEFAULT_STATE_DIR", "MESH_FILE", "Mesh", "SIDECARS", "Sidecar"]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
MESH_FILE = HERE / "mesh.yaml"
DEFAULT_STATE_DIR = ROOT / ".pake" / "demo"
CONTROL = {"listen": "127.0.0.1:15010", "admin": "127.0.0.1:15014", "otlp": "127.0.0.1:4318"}


@dataclass(frozen=True, slots=True)
class Sidecar:
    """One sidecar of the demo: its bootstrap in ``sidecars/<name>.yaml``, and the app (by
    name, from the apps process) its inbound forwards to."""

    name: str
    app: str | None = None


# The apps, in the order of their default ports (8080, 8081, ...), and their sidecars.
APPS = ("echo", "auth", "data", "ai", "ai-canary", "knowledge", "cache", "audit")
SIDECARS = (*(Sidecar(name, app=name) for name in APPS), Sidecar("gateway"), Sidecar("frontend"))
CALLERS = ("knowledge", "cache")  # apps that call other services through their sidecar's outbound


def load_mesh(path: Path = MESH_FILE) -> dict[str, Any]:
    """The mesh file as the control plane gets it: ``jwks_file`` paths made absolute."""
    mesh: dict[str, Any] = parse_yaml(path.read_text())  # the loaders' own YAML 1.2 reading
    for provider in (mesh.get("jwt_providers") or {}).values():
        if "jwks_file" in provider:
            provider["jwks_file"] = str((path.parent / provider["jwks_file"]).resolve())
    return mesh


def _bind(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as exc:
        sock.close()
        raise DemoError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror} (try --ports-offset N)") from None
    sock.set_inheritable(True)
    return sock


@dataclass
class Mesh:
    """The running demo: the control plane, the apps, the sidecars (by name)."""

    state_dir: Path
    shift: int | None  # None: every port 0
    stop: asyncio.Event
    quiet: bool = True  # children's output goes to <state-dir>/logs/<name>.log only
    tracing: bool = True
    sidecars: tuple[Sidecar, ...] = SIDECARS
    apps: tuple[str, ...] = APPS
    children: list[Child] = field(default_factory=list)
    running: dict[str, Child] = field(default_factory=dict)
    control: ControlPlane | None = None
    version: int = 0
    shipper: AuditShipper = field(default_factory=AuditShipper)
    watchers: list[LineHook] = field(default_factory=list)  # (child name, line) of every line
    _http: aiohttp.ClientSession | None = None
    _run_dir: Path | None = None

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    def _child(self, name: str, argv: list[str], ready: Ready, **kw: Any) -> Child:
        return Child(name, argv, ready, quiet=self.quiet, log=self.logs / f"{name}.log",
                     on_line=self._line, **kw)

    def _line(self, name: str, line: str) -> None:
        self.shipper.offer(name, line)
        for watch in self.watchers:
            watch(name, line)

    def port(self, name: str, listener: str) -> int:
        return self.running[name].ports[listener]

    def address(self, name: str, listener: str) -> str:
        return f"127.0.0.1:{self.port(name, listener)}"

    async def _start(self, child: Child) -> Child:
        assert self._run_dir is not None
        self.children.append(child)
        await until(child.start(self._run_dir), self.stop)
        self.running[child.name] = child
        return child

    async def __aenter__(self) -> Mesh:
        try:
            await self._up()
        except BaseException:
            await self.down()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.down()

    async def _up(self) -> None:
        self._run_dir = Path(tempfile.mkdtemp(prefix="pake-demo-"))
        control_dir = self.state_dir / "control"
        sidecar_states = self.state_dir / "sidecars"
        if not (control_dir / "store").exists() and sidecar_states.exists():
            # A new CA: identities from an earlier one would never be trusted again.
            shutil.rmtree(sidecar_states)
        self.logs.mkdir(parents=True, exist_ok=True)
        argv = python("-m", "control", "serve", "--state-dir", str(control_dir),
                      "--listen", shift_address(CONTROL["listen"], self.shift),
                      "--admin", shift_address(CONTROL["admin"], self.shift))
        if self.tracing:
            argv += ["--otlp", shift_address(CONTROL["otlp"], self.shift)]
        plane = await self._start(self._child("control", argv, serving_ready))
        self._http = aiohttp.ClientSession()
        self.control = ControlPlane(f"127.0.0.1:{plane.ports['admin']}", self._http)
        self.version, applied = await self.control.apply(load_mesh())
        print(f"[demo] mesh.yaml {'applied as' if applied else 'already running as'} "
              f"version {self.version}", flush=True)
        # The apps' sockets are bound here, so that the sidecars can start first (they know
        # where their app listens) and the apps are told their sidecar's outbound address.
        sockets = {name: _bind(self._app_port(i)) for i, name in enumerate(self.apps)}
        try:
            app_ports = {name: sock.getsockname()[1] for name, sock in sockets.items()}
            configs = [await self._bootstrap(s, app_ports) for s in self.sidecars]
            await asyncio.gather(*(self._start(self._child(s.name, python("-m", "sidecar", "run", "-c", str(path)),
                                                           sidecar_ready))
                                   for s, path in zip(self.sidecars, configs)))
            outbound = [f"--outbound={name}={self.address(name, 'outbound')}" for name in CALLERS
                        if name in self.running]
            await self._start(self._child(
                "apps", python("-m", "examples.pake.apps", *(f"{n}=fd:{s.fileno()}" for n, s in sockets.items()),
                               *outbound),
                apps_ready(set(self.apps)), pass_fds=tuple(s.fileno() for s in sockets.values())))
        finally:
            for sock in sockets.values():
                sock.close()  # the apps process holds its own copies
        if "audit" in app_ports:
            self.shipper.start(f"http://127.0.0.1:{app_ports['audit']}/ingest", self._http)
        nodes = {s.name: (sidecar_states / s.name / "state" / "node").read_text().strip()
                 for s in self.sidecars}
        await until(self.control.converged(nodes), self.stop)

    def _app_port(self, index: int) -> int:
        return 0 if self.shift is None else 8080 + index + self.shift

    async def _bootstrap(self, sidecar: Sidecar, app_ports: Mapping[str, int]) -> Path:
        """``sidecars/<name>.yaml`` with the ports, the control plane's address, the token file
        and the state directory filled in; a join token when the state holds no identity."""
        assert self._run_dir is not None and self.control is not None
        boot: dict[str, Any] = parse_yaml((HERE / "sidecars" / f"{sidecar.name}.yaml").read_text())
        for key, value in boot["listeners"].items():
            if isinstance(value, dict):
                value["address"] = shift_address(value["address"], self.shift)
            else:
                boot["listeners"][key] = shift_address(value, self.shift)
        if sidecar.app is not None:
            boot["app"] = f"127.0.0.1:{app_ports[sidecar.app]}"
        home = self.state_dir / "sidecars" / sidecar.name
        home.mkdir(parents=True, exist_ok=True)
        state = home / "state"
        if not identity_usable(state):
            shutil.rmtree(state, ignore_errors=True)
            token_file = self._run_dir / f"{sidecar.name}.token"
            token_file.write_text(await self.control.token(boot["service"]) + "\n")
            token_file.chmod(0o600)
            boot["control"]["token_file"] = str(token_file)
        else:
            boot["control"].pop("token_file", None)  # joined before: its identity is enough
        plane = self.running["control"].ports
        boot["control"]["addresses"] = [f"127.0.0.1:{plane['listen']}"]
        boot["control"]["state_dir"] = str(state)
        if self.tracing and "otlp" in plane:
            boot["tracing"] = {"endpoint": f"http://127.0.0.1:{plane['otlp']}", "sample": "100%",
                               "interval": "200ms"}
        path = self._run_dir / f"{sidecar.name}.yaml"
        path.write_text(yaml.safe_dump(boot, sort_keys=False))
        return path

    async def down(self) -> None:
        """Stop every process, the last started first (the control plane last)."""
        await self.shipper.stop()
        for child in reversed(self.children):
            await child.stop()
        self.children.clear()
        if self._http is not None:
            await self._http.close()
            self._http = None
        if self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
            self._run_dir = None

    @property
    def pids(self) -> list[int]:
        return [c.pid for c in self.children if c.pid is not None]


__all__ += ["CONTROL", "load_mesh"]
