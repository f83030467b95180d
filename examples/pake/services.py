"""The PAKE demo's services as small aiohttp apps: real, tiny behaviours, no mesh code.

Each app is plain HTTP on loopback behind its own sidecar. Who may call it is its sidecar's
business (``mesh.yaml``), so the apps trust the headers their sidecar sets (``x-user``,
``x-pake-principal``, ``x-pake-roles``, ``x-pake-peer-identity``). ``knowledge`` and ``cache``
call other services through their own sidecar's outbound listener, naming the service in
the Host header (the address comes from ``--outbound``, as an app would get ``HTTP_PROXY``).

- ``auth``: who am I: the caller as auth's own sidecar verified the token the gateway
  forwarded (``x-user``, ``x-pake-roles``), and the peer that called (the gateway).
- ``data``: items kept in memory (bounded); list, get, add.
- ``ai``: answers slowly (``AI_DELAY``); ``POST /admin/fail`` on the app's own port (not
  through the mesh) makes it answer 503 until told otherwise. ``ai-canary`` is the same app
  as model ``v2``.
- ``knowledge``: ``/api/ask?q=`` reads matching items from ``data`` and asks ``ai``;
  ``/api/items`` lists and adds items in ``data``; ``/api/items/{id}`` reads through ``cache``.
- ``cache``: a bounded TTL cache in front of ``data``'s ``GET /items/{id}`` (``x-cache``).
- ``audit``: receives the mesh's audit records (``POST /ingest``, from the demo's log
  shipper) and answers ``/audit/stats`` and ``/audit/records``.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
from aiohttp import web

__all__ = ["AI_DELAY", "APPS", "make_apps"]

AI_DELAY = 0.1  # seconds per answer: "slow", but a tour of hundreds of calls stays short
MAX_ITEMS = 10_000
MAX_AUDIT = 10_000
CACHE_SIZE = 1_000
CACHE_TTL = 10.0
OUTBOUND = web.AppKey("outbound", str)
HTTP = web.AppKey("http", aiohttp.ClientSession)


def _caller(request: web.Request) -> dict[str, Any]:
    roles = request.headers.get("x-pake-roles", "")
    return {"principal": request.headers.get("x-pake-principal") or request.headers.get("x-user"),
            "roles": [r for r in roles.split(",") if r],
            "peer": request.headers.get("x-pake-peer-identity")}


# === auth ===

def make_auth() -> web.Application:
    app = web.Application()

    async def whoami(request: web.Request) -> web.Response:
        return web.json_response(_caller(request))

    app.router.add_get("/auth/whoami", whoami)
    return app


# === data ===

def make_data() -> web.Application:
    app = web.Application(client_max_size=64 * 1024)
    items: OrderedDict[int, dict[str, Any]] = OrderedDict()
    next_id = [1]
    for text in ("Sidecars terminate mTLS with SPIFFE identities.",
                 "The control plane pushes config snapshots over a WebSocket.",
                 "Circuit breakers turn a failing dependency into fast 503s.",
                 "Canary splits send a share of traffic to a new version."):
        items[next_id[0]] = {"id": next_id[0], "text": text}
        next_id[0] += 1

    async def listing(request: web.Request) -> web.Response:
        q = request.query.get("q", "").lower()
        found = [i for i in items.values() if q in i["text"].lower()]
        return web.json_response({"items": found[:50], "total": len(found)})

    async def get(request: web.Request) -> web.Response:
        item = items.get(int(request.match_info["id"]))
        if item is None:
            return web.json_response({"error": "not_found"}, status=404)
        return web.json_response(item)

    async def add(request: web.Request) -> web.Response:
        try:
            body = await request.json()
            text = str(body["text"])[:1000]
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": "bad_request", "detail": 'expected {"text": "..."}'},
                                     status=400)
        if len(items) >= MAX_ITEMS:
            items.popitem(last=False)  # bounded: the oldest goes
        item = {"id": next_id[0], "text": text, "by": _caller(request)["principal"]}
        items[next_id[0]] = item
        next_id[0] += 1
        return web.json_response(item, status=201)

    app.router.add_get("/items", listing)
    app.router.add_get("/items/{id:\\d+}", get)
    app.router.add_post("/items", add)
    return app


# === ai ===

def make_ai(model: str = "v1") -> Callable[[], web.Application]:
    def factory() -> web.Application:
        app = web.Application()
        state = {"failing": False, "answered": 0, "refused": 0}

        async def answer(request: web.Request) -> web.Response:
            await asyncio.sleep(AI_DELAY)
            if state["failing"]:
                state["refused"] += 1
                return web.json_response({"error": "model_unavailable", "model": model}, status=503)
            state["answered"] += 1
            q = request.query.get("q", "")
            return web.json_response({"model": model, "answer": f"[{model}] about {q!r}: "
                                      "ask the data, then trust the mesh."})

        async def fail(request: web.Request) -> web.Response:
            body = await request.json() if request.can_read_body else {}
            state["failing"] = bool(body.get("fail", True))
            return web.json_response(state)

        app.router.add_get("/answer", answer)
        app.router.add_post("/admin/fail", fail)
        app.router.add_get("/admin/state", lambda r: _state(state))
        return app

    return factory


async def _state(state: Mapping[str, Any]) -> web.Response:
    return web.json_response(dict(state))


# === the apps that call others: knowledge, cache ===

async def _client(app: web.Application) -> Any:
    app[HTTP] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
    yield
    await app[HTTP].close()


async def _call(request: web.Request, service: str, method: str, path: str,
                **kw: Any) -> tuple[int, Any, str]:
    """Through this app's sidecar: (status, JSON body, the sidecar's x-pake-flags)."""
    app = request.app
    headers = {"Host": service}
    for name in ("authorization", "traceparent", "tracestate"):  # the caller's token and trace
        if name in request.headers:
            headers[name] = request.headers[name]
    async with app[HTTP].request(method, f"http://{app[OUTBOUND]}{path}", headers=headers, **kw) as r:
        body = await r.json(content_type=None)
        return r.status, body, r.headers.get("x-pake-flags", "")


def make_knowledge(outbound: str) -> web.Application:
    app = web.Application(client_max_size=64 * 1024)
    app[OUTBOUND] = outbound
    app.cleanup_ctx.append(_client)

    async def ask(request: web.Request) -> web.Response:
        q = request.query.get("q", "mesh")
        status, found, _ = await _call(request, "data", "GET", "/items", params={"q": q})
        sources = found.get("items", []) if status == 200 else []
        status, answer, flags = await _call(request, "ai", "GET", "/answer", params={"q": q})
        if status != 200:
            return web.json_response({"error": "ai_unavailable", "ai_status": status, "ai_flags": flags,
                                      "detail": answer.get("detail") or answer.get("error")}, status=503)
        return web.json_response({"question": q, "answer": answer["answer"], "model": answer["model"],
                                  "sources": [s["id"] for s in sources]})

    async def items(request: web.Request) -> web.Response:
        if request.method == "POST":
            status, body, _ = await _call(request, "data", "POST", "/items", json=await request.json())
        else:
            status, body, _ = await _call(request, "data", "GET", "/items", params=request.query)
        return web.json_response(body, status=status)

    async def item(request: web.Request) -> web.Response:
        status, body, _ = await _call(request, "cache", "GET", f"/items/{request.match_info['id']}")
        return web.json_response(body, status=status)

    app.router.add_get("/api/ask", ask)
    app.router.add_route("*", "/api/items", items)
    app.router.add_get("/api/items/{id:\\d+}", item)
    return app


def make_cache(outbound: str) -> web.Application:
    app = web.Application()
    app[OUTBOUND] = outbound
    app.cleanup_ctx.append(_client)
    held: OrderedDict[str, tuple[float, int, Any]] = OrderedDict()

    async def get(request: web.Request) -> web.Response:
        key = request.match_info["id"]
        now = time.monotonic()
        hit = held.get(key)
        if hit is not None and now - hit[0] < CACHE_TTL:
            held.move_to_end(key)
            return web.json_response(hit[2], status=hit[1], headers={"x-cache": "hit"})
        status, body, _ = await _call(request, "data", "GET", f"/items/{key}")
        if status in (200, 404):
            held[key] = (now, status, body)
            if len(held) > CACHE_SIZE:
                held.popitem(last=False)
        return web.json_response(body, status=status, headers={"x-cache": "miss"})

    app.router.add_get("/items/{id:\\d+}", get)
    return app


# === audit ===

def make_audit() -> web.Application:
    app = web.Application(client_max_size=4 * 1024 * 1024)
    records: deque[dict[str, Any]] = deque(maxlen=MAX_AUDIT)
    counts: Counter[tuple[str, str]] = Counter()

    async def ingest(request: web.Request) -> web.Response:
        batch = await request.json()
        for record in batch if isinstance(batch, list) else []:
            if isinstance(record, dict):
                records.append(record)
                counts[(str(record.get("service")), str(record.get("decision")))] += 1
        return web.json_response({"received": len(batch) if isinstance(batch, list) else 0})

    async def stats(request: web.Request) -> web.Response:
        by_service: dict[str, dict[str, int]] = {}
        for (service, decision), n in sorted(counts.items()):
            by_service.setdefault(service, {})[decision] = n
        return web.json_response({"records": sum(counts.values()), "kept": len(records),
                                  "by_service": by_service})

    async def listing(request: web.Request) -> web.Response:
        decision = request.query.get("decision")
        request_id = request.query.get("request_id")
        raw = request.query.get("limit", "20")
        limit = max(1, min(int(raw), 500)) if raw.isdigit() else 20
        found = [r for r in reversed(records)
                 if (decision is None or r.get("decision") == decision)
                 and (request_id is None or r.get("request_id") == request_id)]
        return web.json_response({"records": found[:limit]})

    app.router.add_post("/ingest", ingest)
    app.router.add_get("/audit/stats", stats)
    app.router.add_get("/audit/records", listing)
    return app


def make_apps(outbound: Mapping[str, str]) -> dict[str, Callable[[], web.Application]]:
    """Every PAKE app by name; ``outbound`` names the sidecar outbound of the apps that call
    others (knowledge, cache)."""
    return {
        "auth": make_auth, "data": make_data, "ai": make_ai("v1"), "ai-canary": make_ai("v2"),
        "knowledge": lambda: make_knowledge(outbound.get("knowledge", "127.0.0.1:16051")),
        "cache": lambda: make_cache(outbound.get("cache", "127.0.0.1:16061")),
        "audit": make_audit,
    }


APPS: tuple[str, ...] = ("auth", "data", "ai", "ai-canary", "knowledge", "cache", "audit")
