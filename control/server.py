"""`pakectl serve`: the control plane process. Wires store, CA, tokens, registry, streams, push
and the two ports, and reports the ports it bound in one ``serving`` log line.

State directory: ``ca/`` (the `pakectl ca init` layout, created if missing), ``server/`` (the
listen port's certificate, re-issued at start), ``store/`` (the directory store: applied
configs and history, tokens, registry) and ``admin.token`` (only when admin is not loopback).
Listen port (TLS): ``GET /v1/bundle`` (the trust bundle; a joining sidecar checks it against
its token's fingerprint), ``POST /v1/join`` (token + CSR -> certificate + bundle) and
``GET /v1/stream`` (WebSocket, mTLS).
"""

from __future__ import annotations

import asyncio
import ipaddress
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
from control.config import ConfigService
from control.mesh_tokens import MeshTokenKeys
from control.push import Pusher
from control.registry import Registry
from control.store import Store
from control.store_dir import DirectoryStore
from control.stream import SidecarSession, StreamLimits, StreamService
from control.tokens import JoinRefused, TokenService

__all__ = ["ControlPlane", "ServeOptions", "serve"]

log = structlog.get_logger("control.server")
MAX_JOIN_BODY = 64 * 1024


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


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ControlPlane:
    def __init__(self, options: ServeOptions, store: Store, ca: CAService) -> None:
        self.options = options
        self.store = store
        self.ca = ca
        self.config = ConfigService(store, ca.trust_domain)
        self.tokens = TokenService(store, ca.fingerprint)
        self.registry = Registry(store, options.endpoint_grace, self._endpoints_changed)
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
        self.admin_api = AdminApi(config=self.config, tokens=self.tokens, ca=ca,
                                  streams=self.streams, registry=self.registry, pusher=self.pusher,
                                  admin_token=self.admin_token)
        self._runners: list[web.AppRunner] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.ports: dict[str, int] = {}

    @classmethod
    async def open(cls, options: ServeOptions) -> ControlPlane:
        options.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        ca, created = await asyncio.to_thread(CAService.load_or_init, options.state_dir / "ca",
                                              options.workload_ttl)
        if created:
            log.info("ca_created", state_dir=str(options.state_dir / "ca"),
                     trust_domain=ca.trust_domain)
        store = await DirectoryStore.open(options.state_dir / "store")
        return cls(options, store, ca)

    def _admin_token(self) -> str | None:
        if is_loopback(self.options.admin[0]):
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
        await self.registry.load()
        await self.mesh_tokens.load()
        await self.pusher.start()
        listen_ctx = await asyncio.to_thread(self.ca.listen_context)
        for name, app, (host, port), ssl_ctx in (
            ("listen", self.listen_app(), self.options.listen, listen_ctx),
            ("admin", self.admin_api.app(), self.options.admin, None),
        ):
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            site = web.TCPSite(runner, host, port, ssl_context=ssl_ctx, backlog=1024)
            await site.start()
            self._runners.append(runner)
            self.ports[name] = runner.addresses[0][1]
        self._tasks = [asyncio.create_task(self.pusher.run()),
                       asyncio.create_task(self._expire_loop()),
                       asyncio.create_task(self._server_cert_loop()),
                       asyncio.create_task(self.mesh_tokens.run())]
        if self.pusher._applied is not None:
            self.pusher.mark_dirty()
        log.info("serving", listen=f"{self.options.listen[0]}:{self.ports['listen']}",
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
            for reg in await self.registry.expire():
                log.info("endpoint_expired", service=reg.service, node=reg.node, address=reg.address)

    async def _server_cert_loop(self) -> None:
        while True:
            await asyncio.sleep(self.ca.server_renew_delay())
            await asyncio.to_thread(self.ca.renew_server_certificate)
            log.info("server_certificate_renewed")

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for session in list(self.streams.sessions.values()):
            session.close("the control plane is stopping")
        for runner in reversed(self._runners):
            await runner.cleanup()
        await self.store.close()


def configure_logging() -> None:
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(),
        cache_logger_on_first_use=True,
    )


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

