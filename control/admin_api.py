"""The admin API that `pakectl` (and later the dashboard) talks to: JSON over HTTP.

Loopback by default; when bound elsewhere every request must carry the admin token
(``Authorization: Bearer ...``). Mutations are POSTs. Errors are JSON
``{"error": code, "detail": ...}`` (validation: ``"errors": [path-qualified lines]``).
"""

from __future__ import annotations

import asyncio
import difflib
import hmac
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import yaml
from aiohttp import web

from certs.identity import IdentityError
from control.ca_service import CAService
from control.config import ConfigService
from control.push import Pusher
from control.registry import Registry
from control.rotation import CARotation, describe_error
from control.store import Conflict, StoreError
from control.stream import StreamService
from control.tokens import JoinRefused, TokenService
from sidecar.config.reader import ConfigError

__all__ = ["AdminApi"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_BODY = 8 * 1024 * 1024


def _error(status: int, code: str, detail: str, **extra: Any) -> web.Response:
    return web.json_response({"error": code, "detail": detail, **extra}, status=status)


def mesh_yaml(mesh: Any) -> str:
    return yaml.safe_dump(mesh, sort_keys=True, default_flow_style=False)


class AdminApi:
    def __init__(self, *, config: ConfigService, tokens: TokenService, ca: CAService,
                 streams: StreamService, registry: Registry, pusher: Pusher,
                 admin_token: str | None, rotation: CARotation | None = None,
                 extra_routes: Callable[[web.Application], None] | None = None) -> None:
        self.config = config
        self.tokens = tokens
        self.ca = ca
        self.streams = streams
        self.registry = registry
        self.pusher = pusher
        self._admin_token = admin_token
        self.rotation = rotation
        self._extra_routes = extra_routes  # the dashboard, /api/*, /metrics (observability)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth], client_max_size=MAX_BODY)
        app.router.add_get("/v1/health", self.health)
        app.router.add_get("/v1/config", self.get_config)
        app.router.add_post("/v1/config", self.apply)
        app.router.add_get("/v1/config/history", self.history)
        app.router.add_post("/v1/config/rollback", self.rollback)
        app.router.add_get("/v1/status", self.status)
        app.router.add_get("/v1/tokens", self.list_tokens)
        app.router.add_post("/v1/tokens", self.create_token)
        app.router.add_post("/v1/tokens/{id}/revoke", self.revoke_token)
        app.router.add_post("/v1/certs/rotate", self.rotate)
        app.router.add_post("/v1/certs/rotate-ca", self.rotate_ca)
        if self._extra_routes is not None:
            self._extra_routes(app)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._admin_token is not None:
            given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), self._admin_token.encode()):
                return _error(401, "unauthorized",
                              "this admin API is not on loopback: send the admin token "
                              "(--admin-token-file, or PAKECTL_ADMIN_TOKEN)")
        try:
            return await handler(request)
        except StoreError as exc:
            return _error(503, "store_unavailable", str(exc))

    async def _json(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise web.HTTPBadRequest(text=json.dumps({"error": "bad_request",
                                                      "detail": "the body must be JSON"}),
                                     content_type="application/json") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text=json.dumps({"error": "bad_request",
                                                      "detail": "the body must be a JSON object"}),
                                     content_type="application/json")
        return body

    # === config ===

    async def health(self, request: web.Request) -> web.Response:
        current = await self.config.current()
        return web.json_response({"ok": True, "config_version": current and current.version})

    async def get_config(self, request: web.Request) -> web.Response:
        current = await self.config.current()
        if current is None:
            return _error(404, "no_config", "nothing applied yet: pakectl apply -f mesh.yaml")
        return web.json_response({**current.summary(), "mesh": current.mesh})

    async def apply(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        mesh = body.get("mesh")
        by = str(body.get("by") or "unknown")[:200]
        expect = body.get("expect_version")
        if expect is not None and not isinstance(expect, int):
            return _error(400, "bad_request", f"expect_version must be an integer, got {expect!r}")
        if body.get("dry_run"):
            return await self._dry_run(mesh)
        return await self._apply(mesh, by, expect_version=expect)

    async def _apply(self, mesh: Any, by: str, *, expect_version: int | None = None,
                     rollback_of: int | None = None) -> web.Response:
        try:
            applied = await self.config.apply(mesh, by, expect_version=expect_version,
                                              rollback_of=rollback_of)
        except ConfigError as exc:
            return web.json_response({"error": "invalid", "errors": exc.problems}, status=422)
        except Conflict as exc:
            return _error(409, "conflict", str(exc))
        self.pusher.mark_dirty()
        return web.json_response(applied.summary())

    async def _dry_run(self, mesh: Any) -> web.Response:
        problems = await self.config.validate(mesh)
        current = await self.config.current()
        running = "" if current is None else mesh_yaml(current.mesh)
        label = "running (nothing applied)" if current is None else f"running (version {current.version})"
        diff = "".join(difflib.unified_diff(running.splitlines(keepends=True),
                                            mesh_yaml(mesh).splitlines(keepends=True),
                                            fromfile=label, tofile="new"))
        return web.json_response({"valid": not problems, "errors": problems, "diff": diff,
                                  "running_version": current and current.version})

    async def history(self, request: web.Request) -> web.Response:
        versions = await self.config.history()
        return web.json_response({"versions": [v.summary() for v in versions]})

    async def rollback(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        by = str(body.get("by") or "unknown")[:200]
        version = body.get("version")
        current = await self.config.current()
        if current is None:
            return _error(404, "no_config", "nothing applied yet, nothing to roll back")
        if version is None:
            older = [v for v in await self.config.history() if v.version < current.version]
            if not older:
                return _error(404, "no_version", f"version {current.version} is the first one")
            version = older[-1].version
        if not isinstance(version, int):
            return _error(400, "bad_request", f"version must be an integer, got {version!r}")
        target = await self.config.get(version)
        if target is None:
            return _error(404, "no_version", f"there is no version {version} (see pakectl history)")
        return await self._apply(target.mesh, by, rollback_of=version)

    # === status ===

    async def status(self, request: web.Request) -> web.Response:
        current = await self.config.current()
        now = datetime.now(UTC)
        here = self.streams.replica
        sidecars = [{**s.status(), "replica": here} for s in self.streams.sessions.values()]
        connected = {(s["service"], s["node"]) for s in sidecars}
        for reg in self.registry.registrations():
            if (reg.service, reg.node) not in connected:
                # On another replica (its stream state lives there), or gone quiet here.
                remote = self.registry.ephemeral and bool(reg.replica) and reg.replica != here
                sidecars.append({"service": reg.service, "node": reg.node, "address": reg.address,
                                 "connected": remote, "state": "remote" if remote else "disconnected",
                                 "replica": reg.replica or None,
                                 "app_healthy": reg.app_healthy, "held_version": None,
                                 "latest_version": None, "last_nack": None, "cert_expiry": None,
                                 "connected_since": None})
        sidecars.sort(key=lambda s: (s["service"], s["node"]))
        root = self.ca.root
        return web.json_response({
            "config_version": current and current.version,
            "ca": {"trust_domain": self.ca.trust_domain, "fingerprint": self.ca.fingerprint,
                   "not_after": root.not_valid_after_utc.isoformat(),
                   "days_left": (root.not_valid_after_utc - now) / timedelta(days=1)},
            "sidecars": sidecars,
            "now": now.isoformat(),
        })

    # === tokens ===

    async def create_token(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        service, ttl, uses = body.get("service"), body.get("ttl", 3600), body.get("uses", 1)
        if not isinstance(service, str) or not isinstance(ttl, (int, float)) or not isinstance(uses, int):
            return _error(400, "bad_request", "service (string), ttl (seconds), uses (integer)")
        try:
            token, record = await self.tokens.create(service, timedelta(seconds=ttl), uses,
                                                     str(body.get("by") or "unknown")[:200])
        except IdentityError as exc:
            return _error(400, "bad_service", str(exc))
        except ValueError as exc:
            return _error(400, "bad_request", str(exc))
        return web.json_response({"token": str(token), **record.public(datetime.now(UTC))})

    async def list_tokens(self, request: web.Request) -> web.Response:
        now = datetime.now(UTC)
        return web.json_response({"tokens": [t.public(now) for t in await self.tokens.list()]})

    async def revoke_token(self, request: web.Request) -> web.Response:
        try:
            record = await self.tokens.revoke(request.match_info["id"])
        except JoinRefused as exc:
            return _error(409, exc.code, str(exc))
        if record is None:
            return _error(404, "no_token", f"no token {request.match_info['id']!r}")
        return web.json_response(record.public(datetime.now(UTC)))

    # === certificates ===

    async def rotate(self, request: web.Request) -> web.StreamResponse:
        """Renew every connected sidecar's certificate now; progress as NDJSON lines."""
        body = await self._json(request) if request.can_read_body else {}
        timeout = float(body.get("timeout", 30))
        sessions = list(self.streams.sessions.values())
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)

        async def line(item: dict[str, Any]) -> None:
            await response.write(json.dumps(item).encode() + b"\n")

        await line({"event": "start", "total": len(sessions)})
        waits = {asyncio.ensure_future(self.streams.request_renewal(s, "rotate").wait()): s
                 for s in sessions}
        done_count = 0
        pending = set(waits)
        try:
            async with asyncio.timeout(timeout):
                while pending:
                    finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for fut in finished:
                        done_count += 1
                        s = waits[fut]
                        await line({"event": "renewed", "service": s.service, "node": s.node,
                                    "done": done_count, "total": len(sessions),
                                    "not_after": s.cert_not_after.isoformat()})
        except TimeoutError:
            pass
        failed = []
        for fut in pending:
            fut.cancel()
            s = waits[fut]
            reason = s.closed_reason or s.last_cert_error or f"no renewed certificate acked within {timeout}s"
            failed.append({"service": s.service, "node": s.node, "reason": reason})
        await line({"event": "done", "renewed": done_count, "total": len(sessions), "failed": failed})
        await response.write_eof()
        return response

    async def rotate_ca(self, request: web.Request) -> web.StreamResponse:
        """Rotate the CA with an overlap (control/rotation.py); progress as NDJSON lines. The
        rotation runs as long as the request: a client that goes away stops it (it is then
        continued by the next run), noticed at the next progress line (at least every second)."""
        if self.rotation is None:
            return _error(501, "unsupported", "this control plane cannot rotate its CA")
        body = await self._json(request) if request.can_read_body else {}
        timeout = body.get("timeout", 60)
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            return _error(400, "bad_request", f"timeout must be a positive number, got {timeout!r}")
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)

        async def line(item: dict[str, Any]) -> None:
            await response.write(json.dumps(item).encode() + b"\n")

        try:
            result = await self.rotation.run(line, timeout=float(timeout),
                                             by=str(body.get("by") or "unknown")[:200])
        except (ConnectionError, RuntimeError):
            raise  # the client went away: the rotation stops here, resumable
        except Exception as exc:  # the operator gets the reason, not a broken stream
            result = {"ok": False, "error": describe_error(exc)}
        await line({"event": "done", **result})
        await response.write_eof()
        return response
