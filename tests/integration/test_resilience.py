"""Failures contained, end to end (issue 5): a real sidecar process between a real client and
real upstreams that fail on demand.

Each test starts its own sidecar (``SidecarProcess``, every port 0) in front of
``FlakyUpstream``s, drives it over HTTP from aiohttp, and checks three views of what happened:
what the client got, what each upstream saw (``x-pake-attempts`` included), and what the
sidecar logged (``access`` lines with ``attempts``, ``flags`` and ``duration_ms``;
``breaker_transition``, ``endpoint_ejected``, ``endpoint_health``) and shows in ``/clusters``.
Nothing sleeps for readiness: tests wait on log events or poll with a deadline. The only
timed waits are the intervals under test (an open breaker, an ejection), and those are polled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.helpers.flaky_upstream import (HANG, RESET, FlakyUpstream, Reply, Request, Truncate,
                                          ok)
from tests.helpers.sidecar_process import SidecarProcess

BOOT = {"service": "client"}  # an outbound-only sidecar; the services it calls are in the mesh
OFF = {"breaker": {"consecutive_failures": 0}, "outlier": {"consecutive_5xx": 0}}


@dataclass
class Result:
    status: int
    headers: dict[str, str]
    body: bytes
    elapsed: float  # seconds, as the client saw it

    def json(self) -> Any:
        return json.loads(self.body)


async def call(http: aiohttp.ClientSession, sc: SidecarProcess, host: str, path: str = "/",
               *, method: str = "GET", data: bytes | None = None,
               headers: dict[str, str] | None = None) -> Result:
    start = time.perf_counter()
    async with http.request(method, sc.url("outbound") + path, data=data,
                            headers={"Host": host, **(headers or {})}) as resp:
        body = await resp.read()
    return Result(resp.status, dict(resp.headers), body, time.perf_counter() - start)


async def admin_json(http: aiohttp.ClientSession, sc: SidecarProcess, path: str) -> tuple[int, Any]:
    async with http.get(sc.admin + path) as resp:
        return resp.status, await resp.json()


def cluster_of(status_and_body: tuple[int, Any], name: str) -> dict[str, Any]:
    status, body = status_and_body
    assert status == 200, f"/clusters answered {status}: {body}"
    by_name = {c["name"]: c for c in body["clusters"]}
    return by_name[name]


def endpoint_of(cluster: dict[str, Any], address: str) -> dict[str, Any]:
    return next(e for e in cluster["endpoints"] if e["address"] == address)


def access_for(sc: SidecarProcess, host: str) -> list[dict[str, Any]]:
    return [a for a in sc.events("access") if a["authority"] == host]


async def poll(check: Callable[[], Awaitable[bool]], timeout: float, every: float = 0.02) -> None:
    """Run ``check`` until it is true; fail after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(every)


def status_reply(status: int, *headers: tuple[str, str]) -> Callable[[Request], Reply]:
    reply = Reply(status, tuple(headers), b"upstream says %d" % status)
    return lambda request: reply


# === circuit breaker =========================================================================


@pytest.mark.parametrize("failure", ["500", "refused"])
async def test_failing_upstream_trips_the_breaker_which_rejects_fast_then_half_opens_and_closes(
        tmp_path: Path, failure: str) -> None:
    failing = (FlakyUpstream(refuse=True) if failure == "refused"
               else FlakyUpstream(status_reply(500)))
    async with failing as up:
        mesh = {"services": {"orders": {
            "endpoints": [up.address],
            "breaker": {"consecutive_failures": 3, "open_for": "500ms"},
            "retries": {"attempts": 0},
            "outlier": {"consecutive_5xx": 0},
        }}}
        async with SidecarProcess(tmp_path, bootstrap=BOOT, mesh=mesh) as sc, \
                aiohttp.ClientSession() as http:
            for _ in range(3):  # a refused connect is a 503 UF
                assert (await call(http, sc, "orders")).status == (500 if failure == "500" else 503)
            tripped_at = time.monotonic()
            [trip] = await sc.wait_for_event("breaker_transition", timeout=2)
            assert (trip["cluster"], trip["old"], trip["new"], trip["reason"]) == \
                ("orders", "CLOSED", "OPEN", "consecutive_failures")

            # OPEN: answered at once by the sidecar, 503 UO naming the cluster; nothing goes up
            rejected = [await call(http, sc, "orders") for _ in range(100)]
            for r in rejected:
                assert r.status == 503
                assert r.json()["error"] == "circuit_open" and r.headers["x-pake-flags"] == "UO"
                assert "orders" in r.json()["detail"] and "open" in r.json()["detail"]
            seen_while_failing = len(up.requests)
            assert seen_while_failing == (3 if failure == "500" else 0)
            while_open = await admin_json(http, sc, "/clusters")

            # the upstream is fixed; the breaker finds out by a trial request
            if failure == "refused":
                await up.listen()
            up.respond = ok

            async def closed_again() -> bool:
                return (await call(http, sc, "orders")).status == 200

            await poll(closed_again, timeout=3, every=0.025)
            reopened_after = time.monotonic() - tripped_at
            assert 0.45 <= reopened_after < 1.5, reopened_after
            events = await sc.wait_for_event("breaker_transition", count=3, timeout=2)
            after = await admin_json(http, sc, "/clusters")

        # every transition, in order, logged
        assert [(e["old"], e["new"], e["reason"]) for e in events] == [
            ("CLOSED", "OPEN", "consecutive_failures"),
            ("OPEN", "HALF_OPEN", "open_interval_elapsed"),
            ("HALF_OPEN", "CLOSED", "trials_succeeded"),
        ]
        uo = [a for a in access_for(sc, "orders") if a["flags"] == "UO"]
        assert len(uo) >= 100
        assert all(a["status"] == 503 and a["cluster"] == "orders" and a["attempts"] == 0 for a in uo)
        # A rejection costs < 1 ms in the sidecar, by the access log's own clock (request head
        # parsed -> reply written). Judged on the back-to-back burst, by percentiles: the clock
        # stops after the reply's write, which wakes the client on the same 2 CPUs, so a rare
        # sample also holds an OS preemption or, as Python, a full GC (seen: ~1.5 ms once in
        # ~50; p95 over 1 ms once in a full suite run, pure form). Typical: 0.05 ms.
        burst = sorted(a["duration_ms"] for a in uo[:100])
        assert statistics.median(burst) < 0.25, burst
        assert burst[89] < 1.0, burst  # p90
        # and the client sees it fast too (a generous bound: it includes the client's own work)
        assert statistics.median(r.elapsed for r in rejected) < 0.005
        # /clusters shows the state while open and after the close
        open_cluster = cluster_of(while_open, "orders")
        assert open_cluster["breaker"]["state"] == "open"
        assert open_cluster["breaker"]["trips"] == 1
        assert open_cluster["breaker"]["rejections"]["open"] >= 100
        closed_cluster = cluster_of(after, "orders")
        assert closed_cluster["breaker"]["state"] == "closed"
        assert closed_cluster["breaker"]["trips"] == 1


# === retries =================================================================================


@pytest.mark.parametrize("failure", ["refused", "503"])
async def test_a_retry_lands_on_the_healthy_second_endpoint(tmp_path: Path, failure: str) -> None:
    bad_upstream = (FlakyUpstream(refuse=True) if failure == "refused"
                    else FlakyUpstream(status_reply(503)))
    async with bad_upstream as bad, FlakyUpstream() as good:
        mesh = {"services": {"orders": {
            "endpoints": [bad.address, good.address],
            # Half the first tries fail: more than the default 20% budget allows, on purpose.
            "retries": {"attempts": 1, "budget": "100%"},
        }}}
        async with SidecarProcess(tmp_path, bootstrap=BOOT, mesh=mesh) as sc, \
                aiohttp.ClientSession() as http:
            results = [await call(http, sc, "orders", f"/{i}") for i in range(20)]

    assert [r.status for r in results] == [200] * 20
    assert len(good.requests) == 20
    # the bad endpoint did fail tries: five in a row took it out of rotation
    [ejected] = sc.events("endpoint_ejected")
    assert ejected["endpoint"] == bad.address
    retried_at_good = [r for r in good.requests if r.attempt == 2]
    assert retried_at_good, (
        "no request reached the good endpoint as a second try: x-pake-attempts seen "
        f"{[r.attempt for r in good.requests]}, access log attempts "
        f"{[a['attempts'] for a in access_for(sc, 'orders')]}")
    assert {r.attempt for r in good.requests} <= {1, 2}
    if failure == "503":
        assert bad.requests and all(r.attempt == 1 for r in bad.requests)
        assert {r.path for r in bad.requests} == {r.path for r in retried_at_good}
    access = access_for(sc, "orders")
    assert len(access) == 20
    assert all(a["status"] == 200 and a["upstream"] == good.address for a in access)
    assert sorted(a["path"] for a in access if a["attempts"] == 2) == \
        sorted(r.path for r in retried_at_good)
    assert {a["attempts"] for a in access} == {1, 2}


async def test_the_retry_budget_keeps_a_failing_upstream_from_a_retry_storm(tmp_path: Path) -> None:
    async with FlakyUpstream(status_reply(503)) as up:
        mesh = {"services": {"orders": {"endpoints": [up.address], "retries": {"attempts": 2}, **OFF}}}
        async with SidecarProcess(tmp_path, bootstrap=BOOT, mesh=mesh) as sc, \
                aiohttp.ClientSession() as http:
            todo = list(range(200))

            async def client() -> list[int]:
                statuses = []
                while todo:
                    todo.pop()
                    statuses.append((await call(http, sc, "orders")).status)
                return statuses

            statuses = [s for batch in await asyncio.gather(*(client() for _ in range(10)))
                        for s in batch]
            await sc.wait_for_event("access", count=200)

    assert statuses == [503] * 200
    retries = len(up.requests) - 200
    assert 0 < retries, "retries are on: some must have happened"
    assert len(up.requests) <= 1.2 * 200, (len(up.requests), retries)
    access = access_for(sc, "orders")
    assert sum(a["attempts"] for a in access) == len(up.requests)
    assert any("URX" in a["flags"] for a in access)


async def test_a_non_idempotent_post_is_not_retried_by_default_but_a_get_is(tmp_path: Path) -> None:
    async with FlakyUpstream(status_reply(503)) as up, FlakyUpstream(status_reply(503)) as opted:
        mesh = {"services": {
            "orders": {"endpoints": [up.address]},  # default retries: attempts 1, on 503
            "ledger": {"endpoints": [opted.address],
                       "routes": [{"retries": {"attempts": 1, "retry_non_idempotent": True}}]},
        }}
        async with SidecarProcess(tmp_path, bootstrap=BOOT, mesh=mesh) as sc, \
                aiohttp.ClientSession() as http:
            post = await call(http, sc, "orders", "/pay", method="POST", data=b"payload")
            get = await call(http, sc, "orders", "/status")
            opted_post = await call(http, sc, "ledger", "/pay", method="POST", data=b"payload")

    assert (post.status, get.status, opted_post.status) == (503, 503, 503)
    assert [(r.method, r.attempt) for r in up.requests] == [("POST", 1), ("GET", 1), ("GET", 2)]
    assert up.requests[0].body == b"payload"
    # a route that opts in retries the POST, replaying its body
    assert [(r.method, r.attempt, r.body) for r in opted.requests] == \
        [("POST", 1, b"payload"), ("POST", 2, b"payload")]
    by_path = {(a["authority"], a["path"]): a for a in sc.events("access")}
    assert by_path[("orders", "/pay")]["attempts"] == 1
    assert "URX" not in by_path[("orders", "/pay")]["flags"]
    assert by_path[("orders", "/status")]["attempts"] == 2
    assert "URX" in by_path[("orders", "/status")]["flags"]


async def test_a_body_within_max_replay_body_is_sent_again_whole_and_a_larger_one_is_not_retried(
        tmp_path: Path) -> None:
    async with FlakyUpstream(status_reply(503)) as up:
        mesh = {"services": {"ledger": {
            "endpoints": [up.address],
            "routes": [{"retries": {"attempts": 1, "retry_non_idempotent": True,
                                    "max_replay_body": "1KiB"}}], **OFF}}}
        small, at_limit, large = b"s" * 200, b"l" * 1024, b"L" * 1025
        async with SidecarProcess(tmp_path, bootstrap=BOOT, mesh=mesh) as sc, \
                aiohttp.ClientSession() as http:
            statuses = [(await call(http, sc, "ledger", f"/{n}", method="POST", data=body)).status
                        for n, body in (("small", small), ("at-limit", at_limit), ("large", large),
                                        ("empty", b""))]

    assert statuses == [503] * 4
    # the copy kept for a retry is the whole body, up to the bound; past it none is kept
    assert [(r.path, r.attempt, r.body) for r in up.requests] == [
        ("/small", 1, small), ("/small", 2, small), ("/at-limit", 1, at_limit), ("/at-limit", 2, at_limit),
        ("/large", 1, large), ("/empty", 1, b""), ("/empty", 2, b"")]
    attempts = {a["path"]: a["attempts"] for a in sc.events("access")}
    assert attempts == {"/small": 2, "/at-limit": 2, "/large": 1, "/empty": 2}


async def test_a_body_that_came_before_its_route_was_known_is_kept_up_to_the_routes_bound(
        tmp_path: Path) -> None:
    # A body that comes with its head reaches the sidecar before the route (and its
    # max_replay_body) is known: its copy is kept up to the largest bound a route may set, then
    # held to the route's. 200 KiB under a 1 MiB bound is sent again whole; under a 100 KiB
    # bound it is not retried, and no try goes out without its body.
    async with FlakyUpstream(status_reply(503)) as up:
        mesh = {"services": {
            "ledger": {"endpoints": [up.address], "routes": [{"retries": {
                "attempts": 1, "retry_non_idempotent": True, "max_replay_body": "1MiB"}}], **OFF},
            "journal": {"endpoints": [up.address], "routes": [{"retries": {
                "attempts": 1, "retry_non_idempotent": True, "max_replay_body": "100KiB"}}], **OFF}}}
        body = bytes(range(256)) * 800  # 200 KiB
        async with SidecarProcess(tmp_path, bootstrap=BOOT, mesh=mesh) as sc, \
                aiohttp.ClientSession() as http:
            statuses = [(await call(http, sc, service, f"/{service}", method="POST", data=body)).status
                        for service in ("ledger", "journal")]

    assert statuses == [503, 503]
    assert [(r.path, r.attempt) for r in up.requests] == [("/ledger", 1), ("/ledger", 2), ("/journal", 1)]
    assert all(r.body == body for r in up.requests), [(r.path, r.attempt, len(r.body)) for r in up.requests]


async def test_no_retry_once_the_response_started_but_a_reset_before_it_is_retried(
        tmp_path: Path) -> None:
    async with FlakyUpstream(lambda r: Truncate(200, declared=1000, sent=100)) as up, \
            FlakyUpstream(lambda r: RESET if r.attempt == 1 else Reply()) as early:
        aggressive = {"attempts": 2, "on": ["reset", "5xx", "connect-failure"], "budget": "100%"}
        mesh = {"services": {"orders": {"endpoints": [up.address], "retries": aggressive, **OFF},
                             "stock": {"endpoints": [early.address], "retries": aggressive, **OFF}}}
        async with SidecarProcess(tmp_path, bootstrap=BOOT, mesh=mesh) as sc, \
                aiohttp.ClientSession() as http:
            async with http.get(sc.url("outbound") + "/big", headers={"Host": "orders"}) as resp:
                assert resp.status == 200
                assert resp.headers["content-length"] == "1000"
                with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError)):
                    await resp.read()
            await sc.wait_for_event("access", count=1)
            # the control: a reset before any response byte is retried, and succeeds
            control = await call(http, sc, "stock", "/big")

    assert len(up.requests) == 1 and up.requests[0].attempt == 1
    [cut] = access_for(sc, "orders")
    assert cut["attempts"] == 1 and cut["flags"] == "UC" and cut["bytes_out"] == 100
    assert control.status == 200
    assert [r.attempt for r in early.requests] == [1, 2]


async def test_a_per_try_timeout_moves_a_hanging_try_to_the_next_endpoint(tmp_path: Path) -> None:
    async with FlakyUpstream(lambda r: HANG) as hanging, FlakyUpstream() as good:
        mesh = {"services": {"orders": {
            "endpoints": [hanging.address, good.address],
            "retries": {"attempts": 1, "per_try_timeout": "200ms"},
        }}}
        async with SidecarProcess(tmp_path, bootstrap=BOOT, mesh=mesh) as sc, \
                aiohttp.ClientSession() as http:
            results = [await call(http, sc, "orders", f"/{i}") for i in range(4)]

    assert [r.status for r in results] == [200] * 4, [(r.status, r.body) for r in results]
    assert hanging.requests, "round robin sends some first tries to the hanging endpoint"
    slow = [r for r in results if r.elapsed >= 0.2]
    assert len(slow) == len(hanging.requests)
    assert all(r.elapsed < 1.0 for r in results)  # 200 ms, then a fast retry; not the route timeout
    assert sorted(a["attempts"] for a in access_for(sc, "orders")) == \
        sorted([2] * len(hanging.requests) + [1] * (4 - len(hanging.requests)))


async def test_retry_after_is_honoured_within_max_retry_after(tmp_path: Path) -> None:
    def once_then_ok(request: Request) -> Reply:
        return Reply(503, (("retry-after", "1"),)) if request.attempt == 1 else Reply()

    async with FlakyUpstream(once_then_ok) as patient_up, FlakyUpstream(once_then_ok) as impatient_up, \
            FlakyUpstream(status_reply(503, ("retry-after", "30"))) as far_up:
        mesh = {"services": {
            "patient": {"endpoints": [patient_up.address]},  # default max_retry_after: 10s
            "impatient": {"endpoints": [impatient_up.address],
                          "retries": {"max_retry_after": "500ms"}},
            "far": {"endpoints": [far_up.address]},  # asks for 30 s > the default 10 s
        }}
        async with SidecarProcess(tmp_path, bootstrap=BOOT, mesh=mesh) as sc, \
                aiohttp.ClientSession() as http:
            patient = await call(http, sc, "patient")
            impatient = await call(http, sc, "impatient")
            far = await call(http, sc, "far")

    assert patient.status == 200
    assert 0.95 <= patient.elapsed < 2.0, patient.elapsed
    first, second = patient_up.requests
    assert second.at - first.at >= 0.95
    assert (first.attempt, second.attempt) == (1, 2)
    # beyond max_retry_after: no retry, the 503 (and its Retry-After) goes to the client at once
    for result, up in ((impatient, impatient_up), (far, far_up)):
        assert result.status == 503
        assert result.elapsed < 0.5
        assert len(up.requests) == 1
    assert far.headers["Retry-After"] == "30"


# === outlier ejection and health checks ======================================================


async def test_an_ejected_endpoint_gets_no_traffic_until_it_returns(tmp_path: Path) -> None:
    async with FlakyUpstream(status_reply(500)) as flaky, FlakyUpstream() as steady:
        mesh = {"services": {"orders": {
            "endpoints": [flaky.address, steady.address],
            "outlier": {"consecutive_5xx": 3, "base_ejection_time": "1s", "max_ejected_percent": "50%"},
            "retries": {"attempts": 0},
            "breaker": {"consecutive_failures": 0},
        }}}
        async with SidecarProcess(tmp_path, bootstrap=BOOT, mesh=mesh) as sc, \
                aiohttp.ClientSession() as http:
            for _ in range(6):  # round robin: three of them hit the flaky endpoint
                await call(http, sc, "orders")
            ejected_at = time.monotonic()
            [ejected] = await sc.wait_for_event("endpoint_ejected", timeout=2)
            assert (ejected["cluster"], ejected["endpoint"], ejected["reason"]) == \
                ("orders", flaky.address, "consecutive_5xx")
            assert len(flaky.requests) == 3
            flaky.respond = ok  # healthy again, but it stays out for its ejection time

            during = []
            while time.monotonic() - ejected_at < 0.7:
                during.append(await call(http, sc, "orders"))
            while_ejected = await admin_json(http, sc, "/clusters")
            assert len(during) >= 10
            assert all(r.status == 200 for r in during)
            assert len(flaky.requests) == 3, "an ejected endpoint got traffic"

            async def back() -> bool:
                await call(http, sc, "orders")
                return len(flaky.requests) > 3

            await poll(back, timeout=3, every=0.01)
            returned_after = flaky.requests[3].at - ejected_at
            assert 0.9 <= returned_after < 2.0, returned_after
            with contextlib.suppress(TimeoutError):  # asserted below, after the traffic checks
                await sc.wait_for_event("endpoint_returned", timeout=1)
            tail = [await call(http, sc, "orders") for _ in range(10)]
            assert all(r.status == 200 for r in tail)
            assert len(flaky.requests) >= 3 + 1 + 4  # back in the rotation, about half
            after = await admin_json(http, sc, "/clusters")

        out = endpoint_of(cluster_of(while_ejected, "orders"), flaky.address)
        assert out["ejected"] is True and out["ejections"] == 1
        assert endpoint_of(cluster_of(while_ejected, "orders"), steady.address)["ejected"] is False
        assert endpoint_of(cluster_of(after, "orders"), flaky.address)["ejected"] is False
        # the return is logged as the ejection was
        assert [(e["endpoint"], e["reason"]) for e in sc.events("endpoint_returned")] == \
            [(flaky.address, "ejection_time_elapsed")], "the endpoint's return was not logged"


async def test_a_health_check_marks_an_endpoint_down_and_up_and_a_down_one_gets_no_traffic(
        tmp_path: Path) -> None:
    async with FlakyUpstream() as sick, FlakyUpstream() as well:
        mesh = {"services": {"orders": {
            "endpoints": [sick.address, well.address],
            "health_check": {"path": "/healthz", "interval": "200ms", "jitter": "0ms",
                             "timeout": "200ms", "healthy_threshold": 1, "unhealthy_threshold": 2},
            "retries": {"attempts": 0},
        }}}
        async with SidecarProcess(tmp_path, bootstrap=BOOT, mesh=mesh) as sc, \
                aiohttp.ClientSession() as http:
            await poll(lambda: _true(len(sick.probes) >= 1 and len(well.probes) >= 1), timeout=3)
            assert sick.probes[0].path == "/healthz" and sick.probes[0].method == "GET"
            sick.health_status = 503
            [down] = await sc.wait_for_event("endpoint_health", timeout=3)
            assert (down["cluster"], down["endpoint"], down["healthy"]) == ("orders", sick.address, False)
            down_at = time.monotonic()
            results = [await call(http, sc, "orders") for _ in range(20)]
            assert all(r.status == 200 for r in results)
            assert sick.since(down_at) == [], "a down endpoint got traffic"
            assert len(well.since(down_at)) == 20
            while_down = await admin_json(http, sc, "/clusters")

            sick.health_status = 200
            events = await sc.wait_for_event("endpoint_health", count=2, timeout=3)
            assert (events[1]["endpoint"], events[1]["healthy"]) == (sick.address, True)
            up_at = time.monotonic()
            results = [await call(http, sc, "orders") for _ in range(10)]
            assert all(r.status == 200 for r in results)
            assert len(sick.since(up_at)) >= 4  # round robin again
            after = await admin_json(http, sc, "/clusters")

        down_view = endpoint_of(cluster_of(while_down, "orders"), sick.address)
        assert down_view["healthy"] is False
        assert down_view["health_check"]["last_status"] == 503
        assert endpoint_of(cluster_of(while_down, "orders"), well.address)["healthy"] is True
        assert endpoint_of(cluster_of(after, "orders"), sick.address)["healthy"] is True


async def _true(value: bool) -> bool:
    return value


# === traffic splitting and fault injection ===================================================


async def test_a_weighted_split_is_within_two_percent_over_ten_thousand_requests(
        tmp_path: Path) -> None:
    total, workers = 10_000, 32
    async with FlakyUpstream() as stable, FlakyUpstream() as canary:
        mesh = {"services": {
            "web": {"routes": [{"to": [{"service": "web-stable", "weight": 90},
                                       {"service": "web-canary", "weight": 10}]}]},
            "web-stable": {"endpoints": [stable.address]},
            "web-canary": {"endpoints": [canary.address]},
        }}
        connector = aiohttp.TCPConnector(limit=workers)
        async with SidecarProcess(tmp_path, bootstrap=BOOT, mesh=mesh) as sc, \
                aiohttp.ClientSession(connector=connector) as http:
            url = sc.url("outbound") + "/"
            left = [total]
            failures: list[int] = []

            async def client() -> None:
                while left[0] > 0:
                    left[0] -= 1
                    async with http.get(url, headers={"Host": "web"}) as resp:
                        await resp.read()
                        if resp.status != 200:
                            failures.append(resp.status)

            await asyncio.gather(*(client() for _ in range(workers)))

    assert failures == []
    assert len(stable.requests) + len(canary.requests) == total
    share = len(canary.requests) / total
    assert abs(share - 0.10) <= 0.02, share
    clusters = [a["cluster"] for a in sc.events("access")]
    assert clusters.count("web-canary") == len(canary.requests)


async def test_fault_injection_aborts_or_delays_only_where_configured(tmp_path: Path) -> None:
    async with FlakyUpstream() as up:
        mesh = {"services": {
            "aborted": {"endpoints": [up.address],
                        "routes": [{"fault": {"abort": {"status": 503, "percent": "100%"}}}]},
            "delayed": {"endpoints": [up.address],
                        "routes": [{"fault": {"delay": {"fixed": "300ms", "percent": "100%"}}}]},
            "plain": {"endpoints": [up.address]},
        }}
        async with SidecarProcess(tmp_path, bootstrap=BOOT, mesh=mesh) as sc, \
                aiohttp.ClientSession() as http:
            aborted = [await call(http, sc, "aborted") for _ in range(5)]
            delayed = await call(http, sc, "delayed")
            plain = await call(http, sc, "plain")

    hosts = [r.headers.get("host") for r in up.requests]
    for r in aborted:
        assert r.status == 503 and r.json()["error"] == "fault_injected"
    assert "aborted" not in hosts, "an aborted request reached the upstream"
    assert {a["flags"] for a in access_for(sc, "aborted")} == {"FI"}
    assert delayed.status == 200 and delayed.elapsed >= 0.3
    [delayed_log] = access_for(sc, "delayed")
    assert delayed_log["duration_ms"] >= 300 and delayed_log["flags"] == "-"
    assert plain.status == 200 and plain.elapsed < 0.25
    [plain_log] = access_for(sc, "plain")
    assert plain_log["flags"] == "-" and plain_log["duration_ms"] < 250
    assert hosts == ["delayed", "plain"]


# === the local app's health ==================================================================


async def test_readyz_reports_the_local_apps_health(tmp_path: Path) -> None:
    async with FlakyUpstream() as app:
        boot = {"service": "shop", "app": app.address}
        mesh = {"services": {"shop": {
            "endpoints": [],
            "health_check": {"path": "/healthz", "interval": "200ms", "jitter": "0ms",
                             "timeout": "200ms", "healthy_threshold": 1, "unhealthy_threshold": 2},
        }}}
        async with SidecarProcess(tmp_path, bootstrap=boot, mesh=mesh) as sc, \
                aiohttp.ClientSession() as http:
            await poll(lambda: _true(len(app.probes) >= 1), timeout=3)
            status, ready = await admin_json(http, sc, "/readyz")
            assert (status, ready["ready"]) == (200, True)

            app.health_status = 503
            [down] = await sc.wait_for_event("endpoint_health", timeout=3)
            assert (down["cluster"], down["endpoint"], down["healthy"]) == ("local-app", app.address, False)
            status, ready = await admin_json(http, sc, "/readyz")
            assert (status, ready["ready"]) == (503, False), ready

            app.health_status = 200
            await sc.wait_for_event("endpoint_health", count=2, timeout=3)
            status, ready = await admin_json(http, sc, "/readyz")
            assert (status, ready["ready"]) == (200, True)
