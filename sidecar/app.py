"""The sidecar process: owns listeners, clusters, admin, the current snapshot, and the
order of start-up, reload and drain. No module globals: everything hangs off ``Sidecar``.

Drain (SIGTERM): stop accepting, ``/readyz`` answers 503, idle connections close, busy
ones finish their current exchange (up to ``timeouts.drain``), then what is left is
cancelled and the process exits 0.

Reload (SIGHUP) reads ``sidecar.yaml`` and the mesh file again, off the event loop, and hands
them to ``apply``, the one way a config comes into force (the control-plane client calls it
too). ``apply`` compiles the snapshot in a worker thread (schema files are read there),
builds its clusters beside the live ones, and swaps everything with one assignment;
connections and pools that carry over stay. An exchange holds the snapshot it was parsed
under until it is finished; a superseded snapshot's own pools and health checkers are let go
after its last exchange. What ``sidecar.yaml`` changes that cannot apply live (a listener's
address or TLS, the identity, the mesh TLS files) is logged as ``restart_required`` and shown
in ``/config``. An invalid config is logged with its path-qualified error and the old
snapshot keeps serving.
"""

from __future__ import annotations

import asyncio
import functools
import signal
import time
import weakref
from dataclasses import dataclass, replace
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import structlog

from .admin.server import AdminResponse, AdminServer, json_response
from .config.load import load_bootstrap, load_mesh, reloaded_bootstrap
from .config.model import Bootstrap, ListenerConfig, MeshConfig
from .config.redact import redact
from .config.reader import ConfigError
from .errors import DownstreamProtocolError
from .listener.connection import DownstreamConnection, ListenerContext, ServerState
from .listener.listener import Listener, ListenerGroup
from .observability.access_log import AccessLog
from .observability.log_writer import LogOutputs
from .observability.logging import log_control
from .observability.metrics import Metrics
from . import compiled
from .http import wire
from . import pipeline as pipeline_module
from .pipeline import Pipeline
from .audit import build_audit_log
from .clock import MonotonicClock
from .filters.chain import build_chains
from .observability.state_metrics import StateCollector
from .overload import OverloadMonitor
from .discovery.origin import ConfigOrigin, now_iso
from .snapshot import Snapshot, compile_snapshot
from .snapshot_slot import SnapshotSlot
from .upstream.cluster_manager import ClusterManager, retire_later

if TYPE_CHECKING:
    import ssl

    from .discovery.client import ControlClient

    from .jwt.jwks import JwksCache
    from certs.ssl_context import TlsContextSource

    from .discovery.state import StateDir
    from .tls import ServerTls, SidecarTls

__all__ = ["ControlSetup", "Sidecar"]

log = structlog.get_logger("pake.sidecar")


@dataclass(frozen=True, slots=True)
class ControlSetup:
    """A joined sidecar's control-plane side: its state directory and node id (made by
    ``__main__`` before the loop serves, since the identity must be held first)."""

    state: StateDir
    node: str


def _connections(ctx: ListenerContext) -> float:
    """The gauge of a listener's open connections, read when /metrics is rendered."""
    return ctx.connections


def _refused(metrics: Metrics, listener: str, reason: str) -> None:
    """A connection closed at once: ``reason`` is the cap it met (sidecar.listener)."""
    metrics.connections_refused.labels(listener, reason).inc()


class Sidecar:
    def __init__(self, bootstrap: Bootstrap, mesh: MeshConfig, *,
                 tls_source: TlsContextSource | None = None,
                 server_tls: ServerTls | None = None, logs: LogOutputs,
                 origin: ConfigOrigin | None = None, control: ControlSetup | None = None) -> None:
        self.bootstrap = bootstrap  # in force: a reload changes only what applies live
        self._boot = bootstrap  # what the process started with (listeners, identity, TLS)
        self.restart_required: tuple[str, ...] = ()  # sidecar.yaml changes waiting for a restart
        self.logs = logs  # every log's queue and writer; __main__ closes them after the loop
        self.loop = asyncio.get_running_loop()
        self.state = ServerState()
        self.metrics = Metrics()
        self.metrics.watch_log_drops(logs.dropped)
        # Where the config in force came from; None: a joined sidecar that holds no config yet.
        self.origin = origin if origin is not None or control is not None else ConfigOrigin(
            "file", str(bootstrap.mesh_path), now_iso())
        self._control_setup = control
        self.configured = asyncio.Event()  # holds a config: what `run -- APP` waits for
        if self.origin is not None:
            self.configured.set()
        self.control: ControlClient | None = None
        if bootstrap.control is not None and tls_source is None:
            raise ValueError("a sidecar under a control plane needs the TLS source of its identity")
        self.tls = (self._tls(mesh, tls_source)
                    if bootstrap.tls is not None or bootstrap.control is not None else None)
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
        self._applying = asyncio.Lock()  # one apply at a time: each builds on the one before
        self._reloading = asyncio.Lock()
        self.snapshots = SnapshotSlot()  # every listener's: its hold() starts an exchange
        self._swap(mesh, *self._compile(bootstrap, mesh))
        self.metrics.registry.register(StateCollector(
            clusters=lambda: self.snapshot.clusters.values(),
            filters=lambda: {id(f): f for chain in self.snapshot.filters.values() for f in chain}.values(),
            audit=self.audit, jwks=lambda: self.jwks, clock=time.monotonic,
            upstream=self._upstream_counts))
        self.listeners: dict[str, Listener] = {}
        self._group = ListenerGroup()  # for limits.max_total_connections
        self.overload = OverloadMonitor(bootstrap.overload, self.state, self.loop, self.metrics.registry)
        self._contexts: list[ListenerContext] = []
        self._pipelines: list[Pipeline] = []
        self.admin: AdminServer | None = None
        self.tracer = None  # spans to a collector: imported only when configured
        if bootstrap.tracing is not None:
            from .observability.tracing import Tracer
            self.tracer = Tracer(bootstrap.tracing, bootstrap.service, registry=self.metrics.registry)
        self.access_log = (AccessLog(logs.channel("access", bootstrap.access_log.path))
                           if bootstrap.access_log.enabled else None)
        self._access_log_config = bootstrap.access_log
        self.stopping = asyncio.Event()  # SIGTERM, SIGINT or POST /shutdown: drain, then exit
        self._draining: asyncio.Task[None] | None = None  # begin_drain's task

    # === apply: the one way a config comes into force =========================================
    async def apply(self, mesh: MeshConfig, bootstrap: Bootstrap | None = None, *,
                    origin: ConfigOrigin | None = None) -> None:
        """Make ``mesh`` the running config (and ``bootstrap``, as ``reloaded_bootstrap`` trimmed
        it, when a reload read one). Raises ``ConfigError`` (a schema file, a key file) before
        anything changes: the old snapshot keeps serving. Exchanges already parsed finish
        under the snapshot they hold. ``origin``: where it came from (default: the mesh file)."""
        async with self._applying:
            bootstrap = bootstrap or self.bootstrap
            # compiling reads files (JSON schemas) and costs CPU: a worker thread does it
            snapshot, caches = await asyncio.to_thread(self._compile, bootstrap, mesh)
            self._swap(mesh, snapshot, caches, bootstrap)
            if origin is not None:
                self.origin = origin
            elif self._boot.control is None:
                self.origin = ConfigOrigin("file", str(bootstrap.mesh_path), now_iso())
            if self.origin is not None:
                self.configured.set()

    def _compile(self, bootstrap: Bootstrap, mesh: MeshConfig) -> tuple[Snapshot, dict[str, JwksCache]]:
        """Everything of a snapshot but its clusters; touches nothing live, so it may run in a
        worker thread (the caller holds ``_applying``, so ``self.jwks`` and the previous
        filters it reuses do not change meanwhile). Raises ConfigError."""
        previous = self.snapshots.current  # None: the first compile
        caches: dict[str, JwksCache] = {}
        local = mesh.services.get(bootstrap.service)
        wanted = local.authn.jwt if local is not None and local.authn is not None else ()
        if wanted:  # only the providers this sidecar verifies: no keys, no fetches, no PyJWT else
            from .jwt.jwks import build_jwks_caches
            providers = {name: mesh.policy.jwt_providers[name] for name in wanted}
            caches = build_jwks_caches(providers, clock=self.clock,
                                       base_dir=bootstrap.mesh_path.parent, previous=self.jwks)
        filters = build_chains(bootstrap, mesh, caches=caches, audit=self.audit, clock=self.clock,
                               previous=previous.filters if previous is not None else None)
        return compile_snapshot(bootstrap, mesh, filters), caches

    def _swap(self, mesh: MeshConfig, compiled: Snapshot, caches: dict[str, JwksCache],
              bootstrap: Bootstrap | None = None) -> Snapshot:
        """On the loop, in one go (no await): build the clusters beside the live ones, swap the
        whole snapshot with one assignment, then start what is new and retire what is not."""
        bootstrap = bootstrap or self.bootstrap
        clusters = self.clusters.build(mesh, bootstrap.service, bootstrap.app,
                                       mesh_tls=self.tls is not None)
        snapshot = replace(compiled, clusters=clusters)
        # Should an exchange be dropped without being finished, its count would pin the set:
        # once the snapshot itself is gone, nothing can reach its clusters.
        weakref.finalize(snapshot, retire_later, self.loop, self.clusters.retire, clusters).atexit = False
        if self.tls is not None:
            self.tls.use_trust_domain(mesh.trust_domain)
        self.snapshots.set(snapshot)
        self.clusters.activate(clusters)
        self._swap_caches(caches)
        if bootstrap is not self.bootstrap:
            self.bootstrap = bootstrap
            for ctx in self._contexts:  # new connections parse with these; deadlines read them
                ctx.limits, ctx.timeouts = bootstrap.limits, bootstrap.timeouts
            self.overload.configure(bootstrap.overload)
        return snapshot

    @property
    def snapshot(self) -> Snapshot:
        """The snapshot new exchanges run under."""
        snapshot = self.snapshots.current
        assert snapshot is not None  # (set by the constructor's first swap)
        return snapshot

    def _upstream_counts(self) -> dict[str, int]:
        return {"pools": self.clusters.live_pools(),
                "health_checkers": self.clusters.live_health_checkers(),
                "retiring_snapshots": len(self.clusters.retiring)}

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

        resume = self.bootstrap.tls.resume_upstream_sessions if self.bootstrap.tls else False
        return SidecarTls(source or load_source(self.bootstrap, mesh), mesh.trust_domain,
                          self.bootstrap.service, self.metrics.registry,
                          resume_upstream_sessions=resume,
                          watch=self.bootstrap.control is None)  # joined: the control client updates it

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
            pipeline = Pipeline(service=b.service, metrics=self.metrics,
                                access_log=self.access_log, loop=self.loop, scheme=scheme,
                                tracer=self.tracer)
            ctx = ListenerContext(
                name=lc.name, service=b.service, limits=b.limits, timeouts=b.timeouts,
                state=self.state, start=pipeline.start, abort=pipeline.abort, refuse=pipeline.refuse,
                snapshots=self.snapshots,
                on_protocol_error=self._protocol_error, scheme=scheme,
                peer_identity=self.tls.peer_identity if lc.tls and self.tls else None,
                pipeline=pipeline)
            self._contexts.append(ctx)
            self._pipelines.append(pipeline)
            refused = functools.partial(_refused, self.metrics, lc.name)
            listener = Listener(lc, ctx, self.loop, ssl_context=self._server_context(lc),
                                on_refused=refused, group=self._group)
            await listener.start()
            self.listeners[lc.name] = listener
            self.metrics.active_connections.labels(lc.name).set_function(functools.partial(_connections, ctx))
        admin = b.listener("admin")
        if admin is not None:
            self.admin = AdminServer(admin.address[0], admin.address[1], self._admin_routes(),
                                     post_routes=self._admin_mutations(),
                                     timeouts=b.timeouts,
                                     on_refused=self.metrics.connections_refused.labels("admin", "max_connections").inc)
            await self.admin.start()
        if self.tls is not None:
            self.tls.start()
        if self.server_tls is not None:
            self.server_tls.start()
        self.overload.start()
        hot_path = compiled.loaded_form(pipeline_module)
        # (a walk of the package's files: off the loop, which is already serving)
        if hot_path == "compiled" and (stale := await asyncio.to_thread(compiled.stale)):
            # an edit since the last build is not running: `make compile` rebuilds
            log.warning("compiled_form_stale", sources=[str(p) for p in stale[:5]], count=len(stale))
        if hot_path == "compiled" and wire.UNAVAILABLE:
            # (a build for SSE4.2 copied to a CPU without it): correct, and much slower
            log.warning("wire_helpers_unavailable", reason=wire.UNAVAILABLE)
        log.info("ready", service=b.service, version=self.snapshot.version, ports=self.ports(),
                 config=self.origin.info() if self.origin else None, hot_path=hot_path)
        if self._control_setup is not None:
            self.control = self._control_client(self._control_setup)
            self.control.start()

    def _control_client(self, setup: ControlSetup) -> ControlClient:
        from certs.memory_source import MemoryTlsSource

        from .discovery.client import ControlClient, SidecarHooks  # only when joined

        assert self.bootstrap.control is not None and self.tls is not None
        source = self.tls.source
        if not isinstance(source, MemoryTlsSource):
            raise TypeError("a joined sidecar's identity is a MemoryTlsSource")

        async def apply(mesh: MeshConfig, origin: ConfigOrigin) -> None:
            await self.apply(mesh, origin=origin)
            log.info("config_applied", version=mesh.version, origin=origin.info())

        def version() -> str | None:
            return self.snapshot.version if self.origin is not None else None

        def inbound() -> tuple[str, int] | None:
            listener = self.listeners.get("inbound")
            return (listener.config.address[0], listener.port) if listener is not None else None

        from .observability.mesh_stats import StatsReporter

        stats = StatsReporter(self.metrics, lambda: self.snapshot.clusters.clusters)
        hooks = SidecarHooks(apply=apply, version=version,
                             app_healthy=lambda: self.clusters.app_healthy() is not False,
                             inbound=inbound, identity_changed=self.tls.identity_changed,
                             stats=stats.take)
        return ControlClient(self.bootstrap.control, service=self.bootstrap.service,
                             node=setup.node, state=setup.state, source=source, hooks=hooks)

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
    async def reload(self) -> bool:
        """SIGHUP: read both files again (off the loop) and apply what can apply live.
        Reloads run one after the other (signals may come faster than a reload)."""
        async with self._reloading:
            try:
                read = await asyncio.to_thread(load_bootstrap, self.bootstrap.source)
                bootstrap, pending = reloaded_bootstrap(self._boot, read)
                # joined: the mesh config is the control plane's, only sidecar.yaml is re-read
                mesh = (self.snapshot.mesh if self._boot.control is not None
                        else await asyncio.to_thread(load_mesh, read.mesh_path))
                await self.apply(mesh, bootstrap, origin=self.origin if self._boot.control else None)
            except ConfigError as exc:
                log.error("reload_rejected", problems=exc.problems, source=exc.source,
                          keeping=self.snapshot.version)
                return False
            await self._reopen_access_log(bootstrap)
            if (log_setup := log_control()) is not None:  # levels and format apply live
                log_setup.apply(bootstrap.log_level, bootstrap.log_format)
            if pending:
                log.warning("restart_required", changes=pending,
                            detail="sidecar.yaml changes these only on restart; the running values stay")
            self.restart_required = tuple(pending)
            log.info("reloaded", version=self.snapshot.version, restart_required=len(pending))
            return True

    async def _reopen_access_log(self, bootstrap: Bootstrap) -> None:
        """A changed ``access_log``: the new one opens (off the loop) before the old closes."""
        config = bootstrap.access_log
        if self._access_log_config == config:
            return
        # a new file is opened by its writer's first use: off the loop
        channel = await asyncio.to_thread(self.logs.channel, "access", config.path) if config.enabled else None
        new = AccessLog(channel) if channel is not None else None
        self.access_log, self._access_log_config = new, config
        for pipeline in self._pipelines:
            pipeline.access_log = new

    # === drain ==============================================================================
    def begin_drain(self) -> asyncio.Task[None]:
        """Stop taking work: ``/readyz`` 503, listeners stop accepting, exchanges in flight
        finish (up to ``timeouts.drain``). Admin and the process stay up: ``POST /drain``
        starts this alone (a pre-stop hook), SIGTERM and ``POST /shutdown`` then go on to
        ``drain``. Idempotent: the one task of the first call."""
        if self._draining is None:
            self._draining = self.loop.create_task(self._drain_listeners())
        return self._draining

    async def _drain_listeners(self) -> None:
        self.state.draining = True
        if self.control is not None:
            await self.control.stop()
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
        log.info("drained")

    async def drain(self) -> None:
        await asyncio.shield(self.begin_drain())
        await self.clusters.close()
        if self.tracer is not None:
            await self.tracer.close()  # what is queued, bounded: a dead collector holds nothing
        for cache in self.jwks.values():
            await cache.stop()
        self.overload.stop()
        if self.admin is not None:
            self.admin.close()
        if self.tls is not None:
            await self.tls.stop()
        if self.server_tls is not None:
            await self.server_tls.stop()
        log.info("stopped")

    async def _reload(self) -> None:
        await self.reload()

    async def run(self) -> None:
        # Handlers first: a SIGHUP sent as soon as "ready" is logged must reload, not kill
        # (the default action of SIGHUP ends the process).
        self.loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        self.loop.add_signal_handler(signal.SIGINT, self.stopping.set)
        self.loop.add_signal_handler(signal.SIGHUP, lambda: self._background(self._reload()))
        await self.start()
        await self.stopping.wait()
        await self.drain()

    # === admin ==============================================================================
    def _admin_routes(self) -> dict[str, Any]:
        def healthz() -> AdminResponse:
            return json_response(200, {"status": "ok"})

        def readyz() -> AdminResponse:
            # not ready while draining, or while the local app fails its health check
            # ... nor before it holds a config and (under a control plane) a certificate
            app_healthy = self.clusters.app_healthy()
            has_config = self.origin is not None
            has_certificate = self.tls is not None or self._boot.control is None
            ready = not self.state.draining and app_healthy is not False and has_config and has_certificate
            return json_response(200 if ready else 503, {
                "ready": ready, "draining": self.state.draining, "app_healthy": app_healthy,
                "config": has_config, "certificate": has_certificate,
                "service": self.bootstrap.service, "version": self.snapshot.version if has_config else None,
                "ports": self.ports()})

        def metrics() -> AdminResponse:
            return 200, b"text/plain; version=0.0.4; charset=utf-8", self.metrics.render()

        def config() -> AdminResponse:
            return json_response(200, {"bootstrap": redact(self.bootstrap),
                                       "mesh": redact(self.snapshot.mesh),
                                       "version": self.snapshot.version if self.origin else None,
                                       "origin": self.origin.info() if self.origin else None,
                                       "control": self.control.info() if self.control else None,
                                       "restart_required": list(self.restart_required),
                                       "tls": self.tls.info() if self.tls else None,
                                       "server_tls": self.server_tls.info() if self.server_tls else None})

        def clusters() -> AdminResponse:
            now = time.monotonic()  # the router's clock (``deadline``)
            return json_response(200, {"clusters": [c.snapshot(now) for c in self.snapshot.clusters.values()],
                                       "retiring_snapshots": len(self.clusters.retiring)})

        return {"/healthz": healthz, "/readyz": readyz, "/metrics": metrics, "/config": config,
                "/clusters": clusters}

    def _admin_mutations(self) -> dict[str, Any]:
        """POST only, loopback peers only (the admin server checks both)."""
        def drain() -> AdminResponse:
            self.begin_drain()
            return json_response(202, {"draining": True, "deadline_s": self.bootstrap.timeouts.drain})

        def shutdown() -> AdminResponse:
            self.stopping.set()  # run() drains, then the process exits
            return json_response(202, {"draining": True, "exiting": True,
                                       "deadline_s": self.bootstrap.timeouts.drain})

        return {"/drain": drain, "/shutdown": shutdown}

