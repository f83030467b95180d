"""``RateLimit-*`` on every response of a rate-limited route (issue 12), not only on the 429:
a real gateway sidecar in front of a real upstream that sends its own ``RateLimit-Limit``.

A client paces itself by ``RateLimit-Remaining`` before it is refused; a local reply of a
later filter carries them too; a route without a limit carries none of them; the upstream's own
values are replaced, not doubled, so a client never reads two values of one field.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp

from tests.helpers.flaky_upstream import FlakyUpstream, Reply, Request
from tests.helpers.sidecar_process import SidecarProcess

GATEWAY_BOOT = {"service": "gateway", "mode": "gateway",
                "listeners": {"gateway": "127.0.0.1:0", "admin": "127.0.0.1:0"}}
NAMES = ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset", "ratelimit-policy")


def answer(request: Request) -> Reply:
    if request.path.startswith("/api/fail"):
        return Reply(500, (("RateLimit-Limit", "999"),), b"boom")
    return Reply(200, (("RateLimit-Limit", "999"), ("x-app", "1")), b"ok")


async def test_every_answer_of_a_limited_route_carries_the_budget(tmp_path: Path) -> None:
    async with FlakyUpstream(answer) as up:
        mesh = {"services": {
            "gateway": {"routes": [
                # 1/m: no token comes back during the test, so every count is exact
                {"name": "limited", "match": {"path_prefix": "/api/"}, "to": [{"service": "echo"}],
                 "rate_limit": {"rate": "1/m", "burst": 4, "key": "client_ip"},
                 "validation": {"methods": ["GET"]}},
                {"name": "free", "match": {"path_prefix": "/"}, "to": [{"service": "echo"}]}]},
            "echo": {"endpoints": [up.address], "retries": {"attempts": 0},
                     "breaker": {"consecutive_failures": 0}, "outlier": {"consecutive_5xx": 0}}}}
        async with SidecarProcess(tmp_path, bootstrap=GATEWAY_BOOT, mesh=mesh) as sc, \
                aiohttp.ClientSession() as http:
            seen = []
            calls = [("GET", "/api/a"), ("DELETE", "/api/b"), ("GET", "/api/fail"), ("GET", "/api/c"),
                     ("GET", "/api/d"), ("GET", "/free")]
            for method, path in calls:
                async with http.request(method, sc.url("gateway") + path) as r:
                    await r.read()
                    seen.append((r.status, {n: r.headers.getall(n, []) for n in (*NAMES, "x-app")}))

    statuses = [status for status, _ in seen]
    # a local reply after the limit (validation's 405) carries it as the upstream's answers do
    assert statuses == [200, 405, 500, 200, 429, 200]
    remaining = [h["ratelimit-remaining"] for _, h in seen[:5]]
    assert remaining == [["3"], ["2"], ["1"], ["0"], ["0"]]
    for _, headers in seen[:5]:
        # one value each: the upstream's own RateLimit-Limit (999) is replaced, not added to
        assert headers["ratelimit-limit"] == ["4"]
        assert headers["ratelimit-policy"] == ["4;w=240"]
        assert len(headers["ratelimit-reset"]) == 1 and int(headers["ratelimit-reset"][0]) > 0
    assert seen[0][1]["x-app"] == ["1"]  # the upstream's other headers pass untouched
    free = seen[5][1]
    assert free["ratelimit-limit"] == ["999"]  # not limited here: the upstream's own, as sent
    assert all(free[n] == [] for n in NAMES[1:])
