"""docs/metrics.md cannot go stale: each section's table must list exactly the metrics (name,
type, label names) that its process's /metrics serves once every metric has a sample.

A new section (the sidecar's) is one ``## <title>`` table in the doc and one entry in
SECTIONS: an async function that runs the process, makes every metric show a sample and
returns the /metrics text.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client.parser import text_string_to_metric_families

from control.server import ControlPlane, ServeOptions
from sidecar.discovery.protocol import Denial, RouteStats, Stats
from tests.helpers.pki import make_test_pki
from tests.helpers.sidecar_process import SidecarProcess
from tests.helpers.upstreams import RecordingUpstream
from tests.integration.test_control_observability import MESH, admin, histogram, joined, send_stats
from tests.integration.test_policy import API_KEY, API_KEY_HASH, GATEWAY_BOOT, Key, jwks, provider
from tests.integration.test_tracing import tls_of

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
Row = tuple[str, frozenset[str]]  # type, label names


def doc_table(title: str) -> dict[str, Row]:
    """The rows of the table under ``## title``: name -> (type, labels)."""
    text = DOC.read_text()
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m is not None, f"docs/metrics.md has no section '## {title}'"
    rows: dict[str, Row] = {}
    for line in m.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or not cells[0].startswith("`"):
            continue
        labels = frozenset(re.findall(r"`([^`]+)`", cells[2]))
        rows[cells[0].strip("`")] = (cells[1], labels)
    assert rows, f"the section '## {title}' has no table rows"
    return rows


def served(text: str) -> dict[str, Row]:
    """Name -> (type, label names); a counter's ``_created`` timestamps (prometheus-client's
    own counters serve them) are part of the counter, not a metric of their own."""
    out: dict[str, Row] = {}
    families = list(text_string_to_metric_families(text))
    counters = {f.name for f in families if f.type == "counter"}
    for family in families:
        if family.name.endswith("_created") and family.name.removesuffix("_created") in counters:
            continue
        name = family.name + "_total" if family.type == "counter" else family.name
        # (a histogram's ``le`` is its buckets' bound, not a label of the metric)
        labels = frozenset(k for s in family.samples for k in s.labels
                           if not (k == "le" and family.type == "histogram"))
        out[name] = (family.type, labels)
    return out


async def control_plane_metrics(tmp_path: Path) -> str:
    opts = ServeOptions(state_dir=tmp_path / "state", listen=("127.0.0.1", 0),
                        admin=("127.0.0.1", 0), otlp=("127.0.0.1", 0))
    plane = await ControlPlane.open(opts)
    await plane.start()
    try:
        await admin(plane, "/v1/config", "POST", {"mesh": MESH})
        client = await joined(plane, tmp_path, "frontend")
        await send_stats(plane, client, Stats(interval=1.0, routes=(
            RouteStats(route="to-orders", destination="orders", requests=50,
                       latency=histogram(ms5=50)),), denials=(Denial(at=1.0, reason="test"),)))
        async with aiohttp.ClientSession() as http:
            async with http.post(f"http://127.0.0.1:{plane.ports['otlp']}/v1/traces", data=b"",
                                 headers={"Content-Type": "application/x-protobuf"}) as r:
                assert r.status == 200
        await plane.observability.refresh_objectives()
        status, text = await admin(plane, "/metrics")
        assert status == 200
        await client.close()
        return str(text)
    finally:
        await plane.stop()


def full_mesh(echo_inbound: str, dead: str, plain: str) -> dict[str, Any]:
    """The gateway's services: authn (JWT, API key), RBAC, a rate-limited and a validated
    route to ``echo`` (over mTLS), ``down``, whose only endpoint refuses connections, and
    ``plain``, whose endpoint speaks no TLS."""
    routes = [{"name": "limited", "match": {"path_prefix": "/limited/"}, "to": [{"service": "echo"}],
               "rate_limit": {"rate": "1/m", "burst": 1, "key": "subject"}},
              {"name": "validated", "match": {"path_prefix": "/validated/"}, "to": [{"service": "echo"}],
               "validation": {"methods": ["GET"]}},
              {"name": "down", "match": {"path_prefix": "/down/"}, "to": [{"service": "down"}]},
              {"name": "plain", "match": {"path_prefix": "/plain/"}, "to": [{"service": "plain"}]},
              {"name": "api", "match": {"path_prefix": "/"}, "to": [{"service": "echo"}]}]
    policy = {"default": "deny", "rules": [{"name": "no-admin", "deny": {"paths": ["/admin/**"]}},
                                           {"name": "callers", "allow": {"paths": ["/**"]}}]}
    return {"jwt_providers": {"issuer": provider()},
            "api_keys": {"ci": {"hash": API_KEY_HASH, "principal": "ci-bot", "roles": ["deployer"]}},
            "services": {"gateway": {"authn": {"jwt": ["issuer"], "api_keys": ["ci"], "required": True},
                                     "policy": policy, "routes": routes},
                         "echo": {"endpoints": [echo_inbound]},
                         "down": {"endpoints": [dead]}, "plain": {"endpoints": [plain]}}}


@asynccontextmanager
async def full_sidecar(tmp_path: Path) -> AsyncIterator[tuple[SidecarProcess, Key]]:
    """A gateway sidecar with every feature that has metrics on: mTLS to an ``echo`` sidecar,
    JWT and API keys, RBAC, a rate limit, validation, tracing (to a collector that is down)."""
    key = Key("key-1", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    pki = make_test_pki(tmp_path / "pki", services=["gateway", "echo"])
    with socket.socket() as dead:  # bound, never listening: connections are refused
        dead.bind(("127.0.0.1", 0))
        dead_address = f"127.0.0.1:{dead.getsockname()[1]}"
        async with RecordingUpstream() as app:
            echo = SidecarProcess(tmp_path, name="echo", bootstrap={
                "service": "echo", "app": app.address, "tls": tls_of(pki, "echo"),
                "listeners": {"inbound": {"address": "127.0.0.1:0", "tls": True}, "admin": "127.0.0.1:0"}},
                mesh={"services": {"echo": {"endpoints": []}}})
            async with echo:
                sc = SidecarProcess(tmp_path, name="gateway", bootstrap={
                    **GATEWAY_BOOT, "tls": tls_of(pki, "gateway"),
                    "listeners": {**GATEWAY_BOOT["listeners"],  # type: ignore[dict-item]
                                  "inbound": {"address": "127.0.0.1:0", "tls": True}},
                    "tracing": {"endpoint": f"http://{dead_address}", "sample": "100%", "interval": "20ms"}},
                    mesh=full_mesh(f"127.0.0.1:{echo.ports['inbound']}", dead_address, app.address))
                (sc.dir / "jwks.json").write_text(json.dumps(jwks(key)))
                async with sc:
                    yield sc, key


async def sidecar_metrics(tmp_path: Path) -> str:
    async with full_sidecar(tmp_path) as (sc, key), aiohttp.ClientSession() as http:
        alice = {"Authorization": f"Bearer {key.token('alice')}"}
        for path, headers, method in (
                ("/hello", alice, "GET"), ("/hello", {"x-api-key": API_KEY}, "GET"),
                ("/hello", {}, "GET"),  # no credentials: 401
                ("/admin/x", alice, "GET"),  # RBAC: 403
                ("/limited/1", alice, "GET"), ("/limited/2", alice, "GET"),  # 429
                ("/validated/1", alice, "POST"),  # 405
                ("/down/1", alice, "GET"),  # connect failure: 503
                ("/plain/1", alice, "GET")):  # a TLS handshake that fails
            async with http.request(method, sc.url("gateway") + path, headers=headers) as r:
                await r.read()
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.ports["gateway"])
        writer.write(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")  # malformed: 400
        await reader.read()
        writer.close()
        anonymous = ssl.create_default_context()  # mTLS without a client certificate: refused
        anonymous.check_hostname, anonymous.verify_mode = False, ssl.CERT_NONE
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", sc.ports["inbound"], ssl=anonymous)
            writer.write(b"GET / HTTP/1.1\r\nHost: gateway\r\n\r\n")
            await writer.drain()
            writer.close()
        async with asyncio.timeout(10):  # counted as the handshake fails; nothing is logged
            while "pake_tls_handshake_failures_total{" not in await scrape(http, sc):
                await asyncio.sleep(0.05)
        cert = Path(sc.bootstrap["tls"]["cert"])  # a broken renewal: a reload that fails
        good = cert.read_bytes()
        cert.write_bytes(b"not a certificate\n")
        await sc.wait_for_event("tls_reload_failed")
        cert.write_bytes(good)
        return await scrape(http, sc)


async def scrape(http: aiohttp.ClientSession, sc: SidecarProcess) -> str:
    async with http.get(sc.admin + "/metrics") as r:
        return await r.text()


SECTIONS: dict[str, Callable[[Path], Awaitable[str]]] = {
    "Control plane": control_plane_metrics,
    "Sidecar": sidecar_metrics,
}


@pytest.mark.parametrize("title", sorted(SECTIONS))
async def test_the_metrics_table_matches_what_is_served(title: str, tmp_path: Path) -> None:
    documented = doc_table(title)
    actual = served(await SECTIONS[title](tmp_path))
    assert sorted(set(actual) - set(documented)) == [], "served but not in docs/metrics.md"
    assert sorted(set(documented) - set(actual)) == [], "in docs/metrics.md but not served"
    for name, row in documented.items():
        assert actual[name] == row, f"{name}: docs say {row}, /metrics serves {actual[name]}"


def series(text: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    return {(s.name, tuple(sorted(s.labels.items())))
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_label_cardinality_stays_bounded_under_varied_traffic(tmp_path: Path) -> None:
    """Many distinct paths, users and request ids add no series to either /metrics: labels
    carry config names and fixed sets only."""
    opts = ServeOptions(state_dir=tmp_path / "state", listen=("127.0.0.1", 0), admin=("127.0.0.1", 0))
    plane = await ControlPlane.open(opts)
    await plane.start()
    try:
        await admin(plane, "/v1/config", "POST", {"mesh": MESH})
        client = await joined(plane, tmp_path, "frontend")
        async with full_sidecar(tmp_path) as (sc, key), aiohttp.ClientSession() as http:

            async def traffic(first: int, count: int) -> None:
                for i in range(first, first + count):
                    user = f"user-{i}"
                    headers = {"Authorization": f"Bearer {key.token(user)}", "x-request-id": f"req-{i}"}
                    for path in (f"/items/{i}?q={i}", f"/admin/{user}", f"/nowhere-{i}/x"):
                        async with http.get(sc.url("gateway") + path, headers=headers) as r:
                            await r.read()
                await send_stats(plane, client, Stats(interval=1.0, routes=tuple(
                    RouteStats(route="to-orders", destination="orders", requests=1) for _ in range(3)),
                    denials=tuple(Denial(at=float(i), reason=f"no rule for /admin/user-{i}",
                                         source=f"user-{i}", path=f"/admin/user-{i}")
                                  for i in range(first, first + count))))

            await traffic(0, 5)
            status, control_text = await admin(plane, "/metrics")
            assert status == 200
            before = (series(await scrape(http, sc)), series(str(control_text)))
            await traffic(5, 25)
            status, control_text = await admin(plane, "/metrics")
            after_text = (await scrape(http, sc), str(control_text))
            after = (series(after_text[0]), series(after_text[1]))
        await client.close()
    finally:
        await plane.stop()
    for old, new in zip(before, after):
        assert {s for s in new if not s[0].endswith("_created")} - old == set()  # no new series
    for text in after_text:
        assert "user-" not in text and "req-" not in text and "/items" not in text and "/admin" not in text
