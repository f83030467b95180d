"""Failure scope, end to end (issue 8): a failure that one endpoint causes is that endpoint's,
and only a service whose every endpoint fails trips the cluster's circuit breaker.

A real sidecar with the DEFAULT resilience config (no ``retries``, ``breaker``, ``outlier``
or ``load_balancer`` section) in front of a service with two endpoints: one real upstream and
one port that refuses connections. Refused connects come back faster than answers, so a
breaker counting every try's failure cluster-wide tripped before the outlier detector ejected
the bad endpoint, and answered 503 ``circuit breaker open`` for the whole ``open_for``.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import aiohttp

from tests.helpers.flaky_upstream import FlakyUpstream
from tests.helpers.sidecar_process import SidecarProcess

BOOT = {"service": "client"}  # an outbound-only sidecar; the service it calls is in the mesh
REQUESTS = 2000
CONCURRENCY = 32
# Failed requests allowed with one bad endpoint of two. A try that the bad endpoint refuses is
# retried on the good one without spending the retry budget, so none should fail; the bound
# leaves room for a scheduler hiccup, not for a tripped breaker (which failed all of them).
MAX_FAILED = 3


async def _drive(sc: SidecarProcess, host: str, total: int,
                 concurrency: int) -> list[tuple[int, str, str]]:
    """``total`` GETs, ``concurrency`` at a time: (status, error code, x-pake-flags) each."""
    results: list[tuple[int, str, str]] = []
    queue = iter(range(total))
    url = sc.url("outbound") + "/"
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def worker() -> None:
            for _ in queue:
                async with http.get(url, headers={"Host": host}) as resp:
                    body = await resp.read()
                    error = json.loads(body).get("error", "") if resp.status >= 500 else ""
                    results.append((resp.status, error, resp.headers.get("x-pake-flags", "")))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


async def test_one_refusing_endpoint_of_two_fails_no_request_with_the_default_config(
        tmp_path: Path) -> None:
    async with FlakyUpstream() as good, FlakyUpstream(refuse=True) as bad:
        mesh = {"services": {"orders": {"endpoints": [good.address, bad.address]}}}
        async with SidecarProcess(tmp_path, bootstrap=BOOT, mesh=mesh) as sc:
            results = await _drive(sc, "orders", REQUESTS, CONCURRENCY)
            transitions = sc.events("breaker_transition")
            ejected = sc.events("endpoint_ejected")

    failed = [r for r in results if r[0] != 200]
    assert len(results) == REQUESTS
    assert len(failed) <= MAX_FAILED, Counter(failed).most_common(5)
    assert not [r for r in failed if r[1] in ("circuit_open", "upstream_overflow")], failed
    assert transitions == []  # the service as a whole never failed
    # the bad endpoint was the outlier detector's to deal with, and it dealt with it
    assert [e["endpoint"] for e in ejected][:1] == [bad.address]
    assert len(good.requests) >= REQUESTS - MAX_FAILED


async def test_the_breaker_still_trips_when_every_endpoint_fails(tmp_path: Path) -> None:
    async with FlakyUpstream(refuse=True) as one, FlakyUpstream(refuse=True) as two:
        mesh = {"services": {"orders": {"endpoints": [one.address, two.address]}}}
        async with SidecarProcess(tmp_path, bootstrap=BOOT, mesh=mesh) as sc:
            sequential = await _drive(sc, "orders", 12, 1)
            [trip] = await sc.wait_for_event("breaker_transition", timeout=2)
            after = await _drive(sc, "orders", 20, 4)

    # connect failures (503 UF, retried once on the other endpoint) until the breaker trips
    assert {r[:2] for r in sequential} <= {(503, "upstream_connect_failure"), (503, "circuit_open")}
    assert (trip["old"], trip["new"], trip["reason"]) == ("CLOSED", "OPEN", "consecutive_failures")
    # then answered at once, with the breaker's own code and flag
    assert set(after) == {(503, "circuit_open", "UO")}
