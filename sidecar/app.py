"""The sidecar process: owns listeners, clusters, admin, the current snapshot, and the
order of start-up, reload and drain. No module globals: everything hangs off ``Sidecar``.

Drain (SIGTERM): stop accepting, ``/readyz`` answers 503, idle connections close, busy
ones finish their current exchange (up to ``timeouts.drain``), then what is left is
cancelled and the process exits 0. Reload (SIGHUP): read the files again; a valid mesh
config becomes the new snapshot (connections and pools stay), an invalid one is logged
with its path-qualified error and the old snapshot keeps serving.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import structlog

from .admin.server import AdminResponse, AdminServer, json_response
from .config.load import load_bootstrap, load_mesh
from .config.model import Bootstrap, ListenerConfig, MeshConfig
from .config.redact import redact
from .config.reader import ConfigError
from .errors import DownstreamProtocolError
from .listener.connection import DownstreamConnection, ListenerContext, ServerState
from .listener.listener import Listener
from .observability.access_log import AccessLog
from .observability.log_writer import LogOutputs
from .observability.metrics import Metrics
from .pipeline import Pipeline
from .audit import build_audit_log
from .clock import MonotonicClock
from .filters.chain import build_chains
from .observability.state_metrics import StateCollector
from .snapshot import Snapshot, build_snapshot
from .upstream.cluster_manager import ClusterManager

if TYPE_CHECKING:
    import ssl

    from .jwt.jwks import JwksCache
    from certs.ssl_context import TlsContextSource

    from .tls import ServerTls, SidecarTls

__all__ = ["Sidecar"]

log = structlog.get_logger("pake.sidecar")


class Sidecar:
    def __init__(self, bootstrap: Bootstrap, mesh: MeshConfig, *,
                 tls_source: TlsContextSource | None = None,
                 server_tls: ServerTls | None = None, logs: LogOutputs) -> None:
        self.bootstrap = bootstrap
        self.logs = logs  # every log's queue and writer; __main__ closes them after the loop
        self.loop = asyncio.get_running_loop()
        self.state = ServerState()
        self.metrics = Metrics()
        self.metrics.watch_log_drops(logs.dropped)
        self.tls = self._tls(mesh, tls_source) if bootstrap.tls is not None else None
        # The gateway listener's certificate for outside clients (server-only TLS).
        gateway = bootstrap.listener("gateway")
        if server_tls is None and gateway is not None and gateway.server_tls is not None:
            from .tls import ServerTls  # pulls in cryptography: only when configured

            server_tls = ServerTls(gateway.server_tls)  # PemError names the bad file
        self.server_tls = server_tls
        self.clusters = ClusterManager(
            self.loop, on_connect_failure=lambda c: self.metrics.connect_failures.labels(c).inc(),
            client_tls=self.tls.client_context if self.tls else (lambda: None), tls=self.tls)
        self.clock = MonotonicClock()
        # Policy state that outlives snapshots: the audit sink and the JWT key caches.
        self.audit = build_audit_log(bootstrap.audit, logs, clock=self.clock, base_dir=bootstrap.source.parent)
        self.jwks: dict[str, JwksCache] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = False
        self.snapshot: Snapshot = self._build(mesh)
        self.metrics.registry.register(StateCollector(
            clusters=lambda: self.clusters.clusters.values(),
            filters=lambda: {id(f): f for chain in self.snapshot.filters.values() for f in chain}.values(),
            audit=self.audit, jwks=lambda: self.jwks, clock=self.loop.time))
        self.listeners: dict[str, Listener] = {}
        self.admin: AdminServer | None = None
        self.access_log = (AccessLog(logs.channel("access", bootstrap.access_log.path))
                           if bootstrap.access_log.enabled else None)
        self.stopping = asyncio.Event()

    def _build(self, mesh: MeshConfig) -> Snapshot:
        """Compile a snapshot; raises ConfigError before anything is swapped."""
        previous = getattr(self, "snapshot", None)
        caches: dict[str, JwksCache] = {}
        local = mesh.services.get(self.bootstrap.service)
        wanted = local.authn.jwt if local is not None and local.authn is not None else ()
        if wanted:  # only the providers this sidecar verifies: no keys, no fetches, no PyJWT else
            from .jwt.jwks import build_jwks_caches
            providers = {name: mesh.policy.jwt_providers[name] for name in wanted}
            caches = build_jwks_caches(providers, clock=self.clock,
                                       base_dir=self.bootstrap.mesh_path.parent, previous=self.jwks)
        filters = build_chains(self.bootstrap, mesh, caches=caches, audit=self.audit, clock=self.clock,
                               previous=previous.filters if previous is not None else None)
        snapshot = build_snapshot(self.bootstrap, mesh, filters)
        if self.tls is not None:
            self.tls.use_trust_domain(mesh.trust_domain)
        self.clusters.update(mesh, self.bootstrap.service, self.bootstrap.app,
                             mesh_tls=self.tls is not None)
        self._swap_caches(caches)
        return snapshot

    def _swap_caches(self, caches: dict[str, JwksCache]) -> None:
        """Start the key caches that are new, stop the ones the new snapshot dropped. (The
        first ones are started by ``start``, which waits for their keys.)"""
        old, self.jwks = self.jwks, caches
        for name, cache in caches.items():
            if old.get(name) is not cache and self._started:
                self._background(cache.start())
        for name, cache in old.items():
            if caches.get(name) is not cache:
                self._background(cache.stop())

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` as a task held here: the loop keeps only weak references to tasks."""
        task = self.loop.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _tls(self, mesh: MeshConfig, source: TlsContextSource | None) -> SidecarTls:
        from .tls import SidecarTls, load_source  # pulls in cryptography: only when configured

        assert self.bootstrap.tls is not None
        return SidecarTls(source or load_source(self.bootstrap, mesh), mesh.trust_domain,
                          self.bootstrap.service, self.metrics.registry,
                          resume_upstream_sessions=self.bootstrap.tls.resume_upstream_sessions)

    # === start ==============================================================================
    async def start(self) -> None:
        b = self.bootstrap
        # keys first: a sidecar that says ready must be able to verify a token
        await asyncio.gather(*(cache.start() for cache in self.jwks.values()))
        self._started = True
        for lc in b.listeners:
            if lc.name == "admin":
                continue
            scheme = b"https" if lc.tls or lc.server_tls is not None else b"http"
            pipeline = Pipeline(service=b.service, clusters=self.clusters, metrics=self.metrics,
                                access_log=self.access_log, loop=self.loop, scheme=scheme)
            ctx = ListenerContext(
                name=lc.name, service=b.service, limits=b.limits, timeouts=b.timeouts,
                state=self.state, start=pipeline.start, abort=pipeline.abort, refuse=pipeline.refuse,
                current_snapshot=lambda: self.snapshot,
                on_protocol_error=self._protocol_error, scheme=scheme,
                peer_identity=self.tls.peer_identity if lc.tls and self.tls else None)
            listener = Listener(lc, ctx, self.loop, ssl_context=self._server_context(lc),
                                on_refused=self.metrics.connections_refused.labels(lc.name).inc)
            await listener.start()
            self.listeners[lc.name] = listener
            self.metrics.active_connections.labels(lc.name).set_function(lambda c=ctx: c.connections)
        admin = b.listener("admin")
        if admin is not None:
            self.admin = AdminServer(admin.address[0], admin.address[1], self._admin_routes(),
                                     timeouts=b.timeouts,
                                     on_refused=self.metrics.connections_refused.labels("admin").inc)
            await self.admin.start()
        if self.tls is not None:
            self.tls.start()
        if self.server_tls is not None:
            self.server_tls.start()
        log.info("ready", service=b.service, version=self.snapshot.version, ports=self.ports())

    def _server_context(self, lc: ListenerConfig) -> ssl.SSLContext | None:
        """The listener's TLS: the gateway's server certificate, mesh mTLS, or none."""
        if lc.server_tls is not None:
            if self.server_tls is None:  # a listener declared TLS: never serve it plain
                raise RuntimeError(f"{lc.name} listener: tls is configured but not loaded")
            return self.server_tls.server_context()
        return self.tls.server_context() if lc.tls and self.tls else None

    def ports(self) -> dict[str, int]:
        ports = {name: listener.port for name, listener in self.listeners.items()}
        if self.admin is not None:
            ports["admin"] = self.admin.port
        return ports

    def _protocol_error(self, conn: DownstreamConnection, exc: DownstreamProtocolError) -> None:
        self.metrics.protocol_errors.labels(conn.ctx.name, str(exc.status)).inc()
        self.metrics.local_reply(conn.ctx.name, exc.flag)
        if self.access_log is not None:
            log.info("refused", listener=conn.ctx.name, client=conn.client, status=exc.status,
                     flags=exc.flag, reason=exc.detail)

    # === reload =============================================================================
    def reload(self) -> bool:
        try:
            bootstrap = load_bootstrap(self.bootstrap.source)
            mesh = load_mesh(bootstrap.mesh_path)
            if bootstrap.listeners != self.bootstrap.listeners:
                log.warning("reload_listeners_unchanged",
                            detail="listener addresses change on restart only")
            snapshot = self._build(mesh)
        except ConfigError as exc:
            log.error("reload_rejected", problems=exc.problems, source=exc.source,
                      keeping=self.snapshot.version)
            return False
        self.snapshot = snapshot
        log.info("reloaded", version=self.snapshot.version)
        return True

    # === drain ==============================================================================
    async def drain(self) -> None:
        self.state.draining = True
        for listener in self.listeners.values():
            listener.stop_accepting()
        for conn in list(self.state.connections):
            conn.shutdown()
        deadline = self.bootstrap.timeouts.drain
        log.info("draining", connections=len(self.state.connections), deadline_s=deadline)
        if self.state.connections:
            try:
                async with asyncio.timeout(deadline):
                    await self.state.drained.wait()
            except TimeoutError:
                log.warning("drain_deadline", left=len(self.state.connections))
        for conn in list(self.state.connections):
            conn.abort()
        await self.clusters.close()
        for cache in self.jwks.values():
            await cache.stop()
        if self.admin is not None:
            self.admin.close()
        if self.tls is not None:
            await self.tls.stop()
        if self.server_tls is not None:
            await self.server_tls.stop()
        log.info("stopped")

    async def run(self) -> None:
        await self.start()
        self.loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        self.loop.add_signal_handler(signal.SIGINT, self.stopping.set)
        self.loop.add_signal_handler(signal.SIGHUP, self.reload)
        await self.stopping.wait()
        await self.drain()

    # === admin ==============================================================================
    def _admin_routes(self) -> dict[str, Any]:
        def healthz() -> AdminResponse:
            return json_response(200, {"status": "ok"})

        def readyz() -> AdminResponse:
            # not ready while draining, or while the local app fails its health check
            app_healthy = self.clusters.app_healthy()
            ready = not self.state.draining and app_healthy is not False
            return json_response(200 if ready else 503, {
                "ready": ready, "draining": self.state.draining, "app_healthy": app_healthy,
                "service": self.bootstrap.service, "version": self.snapshot.version,
                "ports": self.ports()})

        def metrics() -> AdminResponse:
            return 200, b"text/plain; version=0.0.4; charset=utf-8", self.metrics.render()

        def config() -> AdminResponse:
            return json_response(200, {"bootstrap": redact(self.bootstrap),
                                       "mesh": redact(self.snapshot.mesh),
                                       "version": self.snapshot.version,
                                       "tls": self.tls.info() if self.tls else None,
                                       "server_tls": self.server_tls.info() if self.server_tls else None})

        def clusters() -> AdminResponse:
            now = self.loop.time()
            return json_response(200, {"clusters": [c.snapshot(now) for c in self.clusters.clusters.values()]})

        return {"/healthz": healthz, "/readyz": readyz, "/metrics": metrics, "/config": config,
                "/clusters": clusters}

