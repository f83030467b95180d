"""`pakectl serve`: the control plane process. Wires store, CA, tokens, registry, streams, push
and the two ports, and reports the ports it bound in one ``serving`` log line.

State directory: ``ca/`` (the `pakectl ca init` layout, created if missing, imported into the
store at first start), ``server/`` (the listen port's certificate, re-issued at start),
``store/`` (the directory store: applied configs and history, tokens, registry, the CA),
``store.key`` (seals the CA key in the store; every replica of one mesh needs the same) and
``admin.token`` (only when admin is not loopback). With ``--store etcd://...`` the state lives
in etcd and several replicas serve one mesh (control/replica.py); each replica follows the
store through one watch (control/view.py), so what any replica writes, every replica pushes.
Listen port (TLS): ``GET /v1/bundle`` (the trust bundle; a joining sidecar checks it against
its token's fingerprint), ``POST /v1/join`` (token + CSR -> certificate + bundle) and
``GET /v1/stream`` (WebSocket, mTLS).
"""

from __future__ import annotations

import asyncio
import secrets
import signal
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from certs import pem
from control.admin_api import AdminApi
from control.ca_service import CAService, CsrRefused, check_csr_name
from control.ca_state import AUTHORITY_KEY, ROTATION_KEY, decode_authority, load_store_key
from control.config import CURRENT, ConfigService, load_applied
from control.observability import Observability
from control.mesh_tokens import MeshTokenKeys
from control.push import Pusher
from control.registry import PREFIX as REGISTRY_PREFIX
from control.registry import Registry
from control.replica import load_authority, open_store
from control.rotation import CARotation
from control.store import Entry, Store, StoreError
from control.store_etcd import EtcdStore
from control.stream import SidecarSession, StreamLimits, StreamService
from control.tokens import JoinRefused, TokenService
from control.view import StoreView
from sidecar.config.reader import is_loopback_host

__all__ = ["ControlPlane", "ServeOptions", "serve"]

log = structlog.get_logger("pake.control.server")
MAX_JOIN_BODY = 64 * 1024
RENEWAL_REASK = 2.0  # seconds before a sidecar lagging behind a new CA is asked again


@dataclass(frozen=True, slots=True)
class ServeOptions:
    state_dir: Path
    listen: tuple[str, int] = ("127.0.0.1", 15010)
    admin: tuple[str, int] = ("127.0.0.1", 15014)
    workload_ttl: timedelta = timedelta(hours=24)
    heartbeat_interval: float = 5.0
    endpoint_grace: float = 15.0
    max_streams: int = 10_000
    debounce: float = 0.02
    max_debounce: float = 0.2
    send_timeout: float = 10.0
    etcd: tuple[str, ...] = ()  # etcd client URLs; empty: the directory store
    store_prefix: str = "/pake/"
    lease_ttl: int = 10
    store_key_file: Path | None = None  # default <state_dir>/store.key
    otlp: tuple[str, int] | None = None  # accept OTLP/HTTP traces here (opt-in)
    stats_window: float = 60.0  # the sliding window of `pakectl top` and the dashboard


class ControlPlane:
    def __init__(self, options: ServeOptions, store: Store, ca: CAService,
                 store_key: bytes = b"") -> None:
        self.options = options
        self.store = store
        self.ca = ca
        self._store_key = store_key
        self.config = ConfigService(store, ca.trust_domain)
        self.tokens = TokenService(store, lambda: self.ca.fingerprint)
        self.registry = Registry(store, options.endpoint_grace, self._endpoints_changed,
                                 ephemeral=bool(options.etcd))
        self.view = StoreView(store, (CURRENT, REGISTRY_PREFIX, "ca/"), self._on_store)
        self.streams = StreamService(
            ca, self.registry,
            StreamLimits(max_streams=options.max_streams, heartbeat_interval=options.heartbeat_interval,
                         send_timeout=options.send_timeout),
            self._session_opened)
        self.mesh_tokens = MeshTokenKeys(store, on_change=lambda: self.pusher.mark_dirty(),
                                         applied=self._mesh_tokens_section)
        self.pusher = Pusher(self.config, self.registry, ca, lambda: self.streams.sessions,
                             debounce=options.debounce, max_delay=options.max_debounce,
                             mesh_tokens=self.mesh_tokens)
        self.admin_token = self._admin_token()
        # Observability: stats from the streams, SLOs, traces, /metrics, the dashboard.
        self.observability = Observability(config=self.config, streams=self.streams,
                                           registry=self.registry, window=options.stats_window)
        self.streams.on_stats = self.observability.on_stats
        self.admin_api = AdminApi(config=self.config, tokens=self.tokens, ca=ca,
                                  streams=self.streams, registry=self.registry, pusher=self.pusher,
                                  admin_token=self.admin_token,
                                  rotation=CARotation(store, ca, self.registry, store_key,
                                                      self.renew_lagging),
                                  extra_routes=self.observability.add_routes)
        self._runners: list[web.AppRunner] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._authority: bytes | None = None  # the CA record last applied
        self._authority_wake = asyncio.Event()
        self.ports: dict[str, int] = {}
        if isinstance(store, EtcdStore):
            store.on_lease_lost = self._lease_lost

    @classmethod
    async def open(cls, options: ServeOptions) -> ControlPlane:
        options.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        key_file = options.store_key_file or options.state_dir / "store.key"
        store_key = await asyncio.to_thread(load_store_key, key_file, create=True)
        store = await open_store(options.state_dir, options.etcd, prefix=options.store_prefix,
                                 lease_ttl=options.lease_ttl)
        try:
            authority = await load_authority(store, options.state_dir / "ca", store_key,
                                             options.workload_ttl)
        except BaseException:
            await store.close()
            raise
        ca = CAService(options.state_dir / "ca", authority, options.workload_ttl)
        return cls(options, store, ca, store_key)

    # === following the store ===

    def _on_store(self, key: str, entry: Entry | None) -> None:
        """Every change of the shared state, whichever replica wrote it (see control/view.py)."""
        if key.startswith(REGISTRY_PREFIX):
            self.registry.on_store(key, entry)
        elif key == CURRENT:
            self.pusher.set_applied(None if entry is None else load_applied(entry.value))
        elif key == AUTHORITY_KEY and entry is not None:
            if entry.value != self._authority:
                self._authority = entry.value
                self._authority_wake.set()
        elif key == ROTATION_KEY and entry is not None:
            self.renew_lagging("ca rotation")  # a (re-)run of a rotation: nudge again

    async def _authority_loop(self) -> None:
        """Swap in the CA record the store holds (the latest, coalesced); a new signer
        renews the listen certificate and every certificate the old signer issued."""
        while True:
            await self._authority_wake.wait()
            self._authority_wake.clear()
            data = self._authority
            if data is None:
                continue
            try:
                ca = decode_authority(data, self._store_key)
            except Exception as exc:  # a damaged record must not stop the replica serving
                log.error("ca_record_unusable", error=str(exc))
                continue
            signer_changed = await asyncio.to_thread(self.ca.swap, ca)
            log.info("ca_updated", signer_changed=signer_changed,
                     roots=len(ca.roots), fingerprint=self.ca.fingerprint)
            self.pusher.mark_dirty()
            if signer_changed:
                self.renew_lagging("new CA")

    def renew_lagging(self, reason: str) -> int:
        """Ask every local sidecar whose certificate is not from the current signer for a
        CSR; returns how many were asked."""
        signer = self.ca.fingerprint
        asked = 0
        # Several triggers fire together (the signer changed, the rotation record moved):
        # one renewal per sidecar, asked again only when it has had time to answer.
        recent = asyncio.get_running_loop().time() - RENEWAL_REASK
        for session in list(self.streams.sessions.values()):
            if (session.cert_root != signer and session.cert_pending is None
                    and session.renewal_asked_at < recent):
                self.streams.request_renewal(session, reason)
                asked += 1
        return asked

    def _lease_lost(self, reason: str) -> None:
        """etcd dropped this replica's lease (its registrations went with it): write them
        again under a new one."""
        task = asyncio.get_running_loop().create_task(self._rewrite_registrations(reason))
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    async def _rewrite_registrations(self, reason: str) -> None:
        try:
            count = await self.registry.rewrite_owned()
        except StoreError as exc:
            log.error("registrations_rewrite_failed", reason=reason, error=str(exc))
            return
        log.warning("registrations_rewritten", reason=reason, count=count)

    def _admin_token(self) -> str | None:
        if is_loopback_host(self.options.admin[0]):
            return None
        path = self.options.state_dir / "admin.token"
        if not path.exists():
            pem.write_atomic(path, secrets.token_urlsafe(32).encode() + b"\n", 0o600)
        return path.read_text().strip()

    def _mesh_tokens_section(self) -> Any:
        applied = self.pusher._applied
        return None if applied is None else applied.mesh.get("mesh_tokens")

    def _endpoints_changed(self) -> None:
        self.pusher.mark_dirty()

    def _session_opened(self, session: SidecarSession) -> None:
        self.pusher.greet(session)
        if session.cert_root != self.ca.fingerprint:  # joined under a root being rotated out
            self.streams.request_renewal(session, "new CA")

    # === the listen port ===

    def listen_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_JOIN_BODY)
        app.router.add_get("/v1/bundle", self.bundle)
        app.router.add_post("/v1/join", self.join)
        app.router.add_get("/v1/stream", self.streams.handle)
        return app

    async def bundle(self, request: web.Request) -> web.Response:
        return web.json_response({"bundle": self.ca.bundle_pem(), "trust_domain": self.ca.trust_domain})

    async def join(self, request: web.Request) -> web.Response:
        """Token + CSR -> certificate + bundle; refusals say which rule failed."""
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            body = None
        if not (isinstance(body, dict) and all(isinstance(body.get(k), str)
                                               for k in ("token", "service", "csr"))):
            return web.json_response({"error": "bad_request",
                                      "detail": "send JSON {token, service, csr}"}, status=400)
        token, service, csr = body["token"], body["service"], body["csr"]
        peer = request.remote
        try:
            await self.tokens.check(token, service)
            # The CSR is checked before a use is taken: a mistake does not burn the token.
            check_csr_name(csr.encode(), service, self.ca.trust_domain)
            record = await self.tokens.consume(token, service)
            chain = self.ca.sign(csr.encode(), service)
        except JoinRefused as exc:
            log.warning("join_refused", service=service, peer=peer, code=exc.code, detail=str(exc))
            return web.json_response({"error": exc.code, "detail": str(exc)}, status=403)
        except CsrRefused as exc:
            log.warning("join_refused", service=service, peer=peer, code="csr_refused", detail=str(exc))
            return web.json_response({"error": "csr_refused", "detail": str(exc)}, status=403)
        log.info("joined", service=service, peer=peer, token=record.id)
        return web.json_response({"certificate": chain, "bundle": self.ca.bundle_pem(),
                                  "trust_domain": self.ca.trust_domain})

    # === lifecycle ===

    async def start(self) -> dict[str, int]:
        await self.view.load()
        self.registry.adopt_all()
        await self.mesh_tokens.load()
        listen_ctx = await asyncio.to_thread(self.ca.listen_context)
        sites = [("listen", self.listen_app(), self.options.listen, listen_ctx),
                 ("admin", self.admin_api.app(), self.options.admin, None)]
        if self.options.otlp is not None:
            sites.append(("otlp", self.observability.receiver.app(), self.options.otlp, None))
        for name, app, (host, port), ssl_ctx in sites:
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            site = web.TCPSite(runner, host, port, ssl_context=ssl_ctx, backlog=1024)
            await site.start()
            self._runners.append(runner)
            self.ports[name] = runner.addresses[0][1]
        self.streams.replica = f"{self.options.listen[0]}:{self.ports['listen']}"
        self._tasks = [asyncio.create_task(self.pusher.run()),
                       asyncio.create_task(self.view.run()),
                       asyncio.create_task(self._authority_loop()),
                       asyncio.create_task(self._expire_loop()),
                       asyncio.create_task(self._server_cert_loop()),
                       asyncio.create_task(self.observability.run()),
                       asyncio.create_task(self.mesh_tokens.run())]
        log.info("serving", listen=f"{self.options.listen[0]}:{self.ports['listen']}",
                 store="etcd" if self.options.etcd else "directory",
                 admin=f"{self.options.admin[0]}:{self.ports['admin']}", ports=self.ports,
                 ca_fingerprint=self.ca.fingerprint, state_dir=str(self.options.state_dir),
                 admin_token_file=None if self.admin_token is None
                 else str(self.options.state_dir / "admin.token"))
        return self.ports

    async def _expire_loop(self) -> None:
        """Every quarter grace: drop registrations whose heartbeats stopped."""
        period = max(0.05, self.options.endpoint_grace / 4)
        while True:
            await asyncio.sleep(period)
            try:
                gone = await self.registry.expire()
            except StoreError as exc:
                log.warning("endpoint_expiry_failed", error=str(exc))
                continue
            for reg in gone:
                log.info("endpoint_expired", service=reg.service, node=reg.node, address=reg.address)

    async def _server_cert_loop(self) -> None:
        while True:
            await asyncio.sleep(self.ca.server_renew_delay())
            await asyncio.to_thread(self.ca.renew_server_certificate)
            log.info("server_certificate_renewed")

    async def stop(self) -> None:
        tasks = [*self._tasks, *self._side_tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for session in list(self.streams.sessions.values()):
            session.close("the control plane is stopping")
        for runner in reversed(self._runners):
            await runner.cleanup()
        await self.store.close()


async def serve(options: ServeOptions) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code."""
    plane = await ControlPlane.open(options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await plane.start()
        await stop.wait()
    finally:
        started = time.monotonic()
        await plane.stop()
        log.info("stopped", took=round(time.monotonic() - started, 3))
    return 0

