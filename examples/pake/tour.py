"""``python -m examples.pake.tour`` (``make demo-tour``): the PAKE mesh, walked through.

Brings up the same mesh as ``make demo`` and then shows, with a printed narrative, what the
mesh does: a call with a valid JWT; one without (401, and why); a service calling one it
may not (403, naming the rule); a rate limit (429); ``ai`` failing: retries, the breaker
opening, fast 503s, recovery; the trace of the first call and where the dashboard shows
it; the canary split measured; ``pakectl certs rotate`` under traffic with no failed
request; the audit service's view. Each step checks its outcome: the exit status is 0 only when
every step showed what it says, and the mesh is shut down either way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy

from examples.mint_token import mint
from examples.pake.launch import DEFAULT_STATE_DIR, Mesh
from examples.runner import DemoError, Stopped, json_event

__all__ = ["main"]


def say(text: str = "") -> None:
    print(text, flush=True)


@dataclass
class Tour:
    mesh: Mesh
    http: aiohttp.ClientSession
    failed: list[str] = field(default_factory=list)
    access: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # trace id -> access lines

    def watch(self, name: str, line: str) -> None:
        """Keep the access lines of knowledge's sidecar (its calls to ai), by trace id."""
        if name == "knowledge" and '"event":"access"' in line:
            event = json_event(line)
            if event is not None and event.get("trace_id") and len(self.access) < 10_000:
                self.access.setdefault(event["trace_id"], []).append(event)

    def check(self, ok: bool, what: str) -> None:
        say(f"   {'✔' if ok else '✘'} {what}")
        if not ok:
            self.failed.append(what)

    @property
    def gateway(self) -> str:
        return f"http://{self.mesh.address('gateway', 'gateway')}"

    async def call(self, url: str, *, sub: str | None = None, host: str | None = None,
                   trace: str | None = None, **kw: Any) -> tuple[int, dict[str, Any], CIMultiDictProxy[str], float]:
        headers: dict[str, str] = dict(kw.pop("headers", {}))
        if sub is not None:
            headers["Authorization"] = "Bearer " + mint(sub, ["admin"] if sub == "alice" else ["reader"], ttl=600)
        if host is not None:
            headers["Host"] = host
        if trace is not None:
            headers["traceparent"] = f"00-{trace}-{secrets.token_hex(8)}-01"
        started = time.monotonic()
        async with self.http.get(url, headers=headers, **kw) as r:
            body = await r.json(content_type=None)
            return r.status, body if isinstance(body, dict) else {}, r.headers, time.monotonic() - started

    # === the steps ===

    async def valid_jwt(self) -> str:
        say("1. A call with a valid JWT: outside -> gateway -> knowledge -> data + ai, all over mTLS")
        trace = secrets.token_hex(16)
        say(f"   curl -H 'Authorization: Bearer <alice, role admin>' {self.gateway}/api/ask?q=breaker")
        status, body, _, took = await self.call(f"{self.gateway}/api/ask?q=breaker", sub="alice", trace=trace)
        say(f"   -> {status} in {took * 1000:.0f} ms: {json.dumps(body)[:160]}")
        self.check(status == 200 and "answer" in body, "200 with an answer from ai and sources from data")
        return trace

    async def no_jwt(self) -> None:
        say("\n2. The same call without a token")
        status, body, headers, _ = await self.call(f"{self.gateway}/api/ask?q=breaker")
        say(f"   -> {status} {body.get('error')}: {body.get('detail')}")
        say(f"   WWW-Authenticate: {headers.get('WWW-Authenticate')}   x-pake-flags: {headers.get('x-pake-flags')}")
        self.check(status == 401, "401 at the gateway: the request never reached knowledge")

    async def forbidden(self) -> str:
        say("\n3. A service calling one it may not: cache's sidecar asks ai (only knowledge may)")
        url = f"http://{self.mesh.address('cache', 'outbound')}/answer?q=x"
        status, body, headers, _ = await self.call(url, host="ai")
        say(f"   -> {status} from {body.get('service')}'s sidecar: {body.get('detail')}")
        self.check(status == 403 and "models-only-for-knowledge" in str(body.get("detail")),
                   "403 naming the rule models-only-for-knowledge (decided by ai's own sidecar on cache's SPIFFE ID)")
        return str(headers.get("x-request-id", ""))

    async def rate_limit(self) -> None:
        say("\n4. Rate limit: the /api/ route allows 5/s per caller (burst 10); mallory sends 20 at once")
        token = {"Authorization": "Bearer " + mint("mallory", ["reader"], ttl=600)}
        results = await asyncio.gather(*(self.call(f"{self.gateway}/api/items", headers=token) for _ in range(20)))
        counts = Counter(r[0] for r in results)
        limited = [r for r in results if r[0] == 429]
        after = limited[0][2].get("Retry-After") if limited else None
        say(f"   -> {dict(sorted(counts.items()))}; a 429 says Retry-After: {after}")
        self.check(counts[200] >= 1 and counts[429] >= 5, "the burst passes, the rest get 429 with Retry-After")

    async def ai_fails(self) -> None:
        say("\n5. ai is told to fail (POST /admin/fail on the app's own port, not through the mesh)")
        for app in ("ai", "ai-canary"):
            async with self.http.post(f"http://{self.mesh.address('apps', app)}/admin/fail", json={"fail": True}) as r:
                await r.read()
        opened = False
        for i in range(8):
            trace = secrets.token_hex(16)
            status, body, _, took = await self.call(f"{self.gateway}/api/ask?q=retry", sub="carol", trace=trace)
            tries = [a.get("attempts") for a in self.access.get(trace, []) if a.get("cluster") in ("ai", "ai-canary")]
            flags = body.get("ai_flags") or "-"
            say(f"   call {i + 1}: {status} in {took * 1000:4.0f} ms; ai: {body.get('ai_status')} "
                f"flags {flags}; knowledge's sidecar tried ai {tries[0] if tries else '?'} time(s)")
            if "UO" in flags:
                opened = True
                if took < 0.1:
                    break
        self.check(opened, "retries first (3 tries a call), then the breaker opens: fast 503s flagged UO, ai is not called")
        for app in ("ai", "ai-canary"):
            async with self.http.post(f"http://{self.mesh.address('apps', app)}/admin/fail", json={"fail": False}) as r:
                await r.read()
        say("   ai recovers; the breaker lets a trial request through once open_for (2s) has passed")
        started = time.monotonic()
        status = 0
        models: set[str] = set()
        while time.monotonic() - started < 20 and not {"v1", "v2"} <= models:
            # each model has its own breaker in knowledge's sidecar: wait until both closed
            # (the canary's, tripped too, would otherwise answer the next step's 10% with 503s)
            status, body, _, _ = await self.call(f"{self.gateway}/api/ask?q=recovered", sub="carol")
            if status == 200:
                models.add(str(body.get("model")))
            else:
                await asyncio.sleep(0.4)
        say(f"   -> {status} after {time.monotonic() - started:.1f} s: {body.get('answer', body)}")
        self.check({"v1", "v2"} <= models, "the breakers closed again: answers are back from both models")

    async def trace(self, trace_id: str) -> None:
        say("\n6. The trace of step 1's call, from the control plane's own collector (every sidecar exports at 100%)")
        admin = self.mesh.address("control", "admin")
        wanted = {"gateway", "knowledge", "data"}
        models = {"ai", "ai-canary"}  # the canary split sends a tenth of calls to ai-canary

        def whole(services: set[str]) -> bool:
            return wanted <= services and bool(models & services)

        body: dict[str, Any] = {}
        started = time.monotonic()
        while time.monotonic() - started < 10:
            async with self.http.get(f"http://{admin}/api/traces/{trace_id}") as r:
                body = await r.json() if r.status == 200 else {}
            if whole(set(body.get("services", ()))) or not self.mesh.tracing:
                break
            await asyncio.sleep(0.3)
        for span in body.get("spans", []):
            say(f"   {'  ' * span['depth']}{span['service']}: {span['name']} ({span['kind']}) "
                f"{span['duration_ms']:.1f} ms")
        say(f"   JSON:      http://{admin}/api/traces/{trace_id}")
        say(f"   dashboard: http://{admin}/dashboard -> Traces -> {trace_id[:16]}...")
        self.check(whole(set(body.get("services", ())))
                   or (not self.mesh.tracing and not body), "one trace across gateway, knowledge, data and ai")

    async def canary(self) -> None:
        n = 200
        say(f"\n7. The canary split: ai's route sends 90% to ai (model v1), 10% to ai-canary (v2); {n} questions "
            "through knowledge's sidecar")
        url = f"http://{self.mesh.address('knowledge', 'outbound')}/answer?q=canary"
        gate = asyncio.Semaphore(25)

        async def one() -> str:
            async with gate:
                status, body, _, _ = await self.call(url, host="ai")
                return str(body.get("model")) if status == 200 else f"HTTP {status}"

        models = Counter(await asyncio.gather(*(one() for _ in range(n))))
        share = models["v2"] / n
        say(f"   -> {dict(sorted(models.items()))}: v2 got {share:.1%}")
        self.check(models["v1"] + models["v2"] == n and 0.03 <= share <= 0.2,
                   "every question answered, about a tenth by the canary")

    async def rotate(self) -> None:
        say("\n8. pakectl certs rotate while traffic flows (frontend -> echo, knowledge -> data, over mTLS)")
        assert self.mesh.control is not None
        ok, failures = 0, []
        stop = asyncio.Event()
        targets = [(f"http://{self.mesh.address('frontend', 'outbound')}/hello", "echo"),
                   (f"http://{self.mesh.address('knowledge', 'outbound')}/items", "data")]

        async def load(url: str, host: str) -> None:
            nonlocal ok
            while not stop.is_set():
                try:
                    status, _, headers, _ = await self.call(url, host=host)
                except aiohttp.ClientError as exc:
                    failures.append(repr(exc))
                    continue
                if status == 200:
                    ok += 1
                else:
                    failures.append(f"{status} {headers.get('x-pake-flags', '')}")

        workers = [asyncio.create_task(load(u, h)) for u, h in targets for _ in range(2)]
        try:
            await asyncio.sleep(0.3)  # traffic first, so the rotation happens under it
            final = await self.mesh.control.rotate()
            await asyncio.sleep(0.3)
        finally:
            stop.set()
            await asyncio.gather(*workers)
        say(f"   -> renewed {final.get('renewed')} of {final.get('total')} certificates; "
            f"{ok + len(failures)} requests meanwhile, {len(failures)} failed {failures[:3]}")
        self.check(bool(final) and final.get("renewed") == final.get("total") and not final.get("failed")
                   and ok > 0 and not failures, "every sidecar renewed, 0 failed requests")

    async def audit(self, request_id: str) -> None:
        say("\n9. The audit service: every sidecar's authn/authz decisions, shipped to it")
        await asyncio.sleep(0.3)  # the sidecars write their records off the hot path
        await self.mesh.shipper.flush()
        admin = {"Authorization": "Bearer " + mint("alice", ["admin"], ttl=600)}
        status, stats, _, _ = await self.call(f"{self.gateway}/audit/stats", headers=admin)
        say(f"   GET /audit/stats (role admin) -> {status}: {stats.get('records')} records: "
            f"{json.dumps(stats.get('by_service'))[:200]}")
        status, found, _, _ = await self.call(f"{self.gateway}/audit/records?request_id={request_id}",
                                              headers=admin)
        denial = [r for r in found.get("records", []) if r.get("decision") == "deny"]
        if denial:
            d = denial[0]
            say(f"   step 3's denial: {d['service']} {d['stage']} {d['decision']} rule {d['rule']}: {d['reason']}")
        self.check(bool(denial), "the 403 of step 3 is in the audit log, with its rule")


async def run(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    shift = None if args.any_ports else args.ports_offset
    say("[demo] starting the PAKE mesh: a control plane, 8 apps, 10 sidecars "
        f"(their output: {Path(args.state_dir).resolve() / 'logs'})")
    started = time.monotonic()
    try:
        async with Mesh(Path(args.state_dir).resolve(), shift, stop) as mesh, aiohttp.ClientSession() as http:
            say(f"[demo] up in {time.monotonic() - started:.1f} s; config version {mesh.version}\n")
            tour = Tour(mesh, http)
            mesh.watchers.append(tour.watch)
            trace = await tour.valid_jwt()
            await tour.no_jwt()
            denied = await tour.forbidden()
            await tour.rate_limit()
            await tour.ai_fails()
            # Before the canary split and the rotation: the collector keeps the newest 1,000
            # traces (CollectorLimits.max_traces), and the rotation's traffic alone can make more.
            await tour.trace(trace)
            await tour.canary()
            await tour.rotate()
            await tour.audit(denied)
            say("")
            if tour.failed:
                say(f"[demo] tour FAILED: {len(tour.failed)} step(s) did not show what they should: {tour.failed}")
            else:
                say(f"[demo] tour complete in {time.monotonic() - started:.1f} s: every step showed what it says")
            code = 1 if tour.failed else 0
    except Stopped:
        say("[demo] interrupted")
        return 130
    except DemoError as exc:
        print(f"[demo] {exc}", file=sys.stderr, flush=True)
        return 1
    say("[demo] stopped")
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.pake.tour", description=__doc__.split("\n")[0])
    ports = parser.add_mutually_exclusive_group()
    ports.add_argument("--ports-offset", type=int, default=0, metavar="N", help="add N to every port")
    ports.add_argument("--any-ports", action="store_true", help="let every process pick a free port")
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                        help=f"the control plane's and sidecars' state (default {DEFAULT_STATE_DIR})")
    args = parser.parse_args(argv)
    import uvloop

    return uvloop.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
