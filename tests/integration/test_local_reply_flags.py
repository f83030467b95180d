"""Every local reply says why in a header (issue 8): ``x-pake-flags`` carries the response
flags the access log records for the exchange, so a client can tell an open breaker from a
full queue, or the sidecar's 503 from the upstream's, without parsing the JSON detail.

One real sidecar, several services each set up to refuse in one way; each reply's header is
checked against the access line with the same request id (and the protocol-error path, which
has no exchange, against its ``refused`` line).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp

from tests.helpers.flaky_upstream import HANG, FlakyUpstream
from tests.helpers.sidecar_process import SidecarProcess

BOOT = {"service": "client"}


async def _get(http: aiohttp.ClientSession, sc: SidecarProcess, host: str, *,
               data: bytes | None = None) -> tuple[int, str, str, str]:
    """(status, error code, x-pake-flags, x-request-id) of one request through the sidecar."""
    async with http.request("POST" if data else "GET", sc.url("outbound") + "/",
                            headers={"Host": host}, data=data) as resp:
        body = json.loads(await resp.read())
        return (resp.status, body["error"], resp.headers.get("x-pake-flags", ""),
                resp.headers["x-request-id"])


def _access(sc: SidecarProcess, request_id: str) -> dict[str, Any]:
    [line] = [a for a in sc.events("access") if a["request_id"] == request_id]
    return line


async def test_every_kind_of_local_reply_carries_its_flags(tmp_path: Path) -> None:
    async with FlakyUpstream(refuse=True) as dead, FlakyUpstream(lambda r: HANG) as stuck, \
            FlakyUpstream() as good:
        no_retry = {"retries": {"attempts": 0}}
        mesh = {"services": {
            "dead": {"endpoints": [dead.address], **no_retry},
            "dead-retried": {"endpoints": [dead.address]},  # default: one retry
            "tripping": {"endpoints": [dead.address], **no_retry,
                         "breaker": {"consecutive_failures": 1, "open_for": "1m"}},
            "busy": {"endpoints": [stuck.address], "breaker": {"max_requests": 1},
                     "timeouts": {"route": "1s"}},
            "small": {"endpoints": [good.address], "max_request_body": 10},
        }}
        async with SidecarProcess(tmp_path, bootstrap=BOOT, mesh=mesh) as sc, \
                aiohttp.ClientSession() as http:
            replies = {
                "no route": await _get(http, sc, "nope.example"),
                "connect failure": await _get(http, sc, "dead"),
                "retries exhausted": await _get(http, sc, "dead-retried"),
                "trips": await _get(http, sc, "tripping"),
                "breaker open": await _get(http, sc, "tripping"),
                "too large": await _get(http, sc, "small", data=b"x" * 100),
            }
            hanging = asyncio.create_task(_get(http, sc, "busy"))
            await stuck.wait_for_requests(1)
            replies["limit full"] = await _get(http, sc, "busy")
            hanging.cancel()

            reader, writer = await asyncio.open_connection("127.0.0.1", sc.ports["outbound"])
            writer.write(b"GET / HTTP/1.1\r\nHost: good\r\nContent-Length: 1\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")  # ambiguous framing
            raw = await reader.readuntil(b"\r\n\r\n")
            writer.close()
            await sc.wait_for_event("access", count=len(replies))
            [refused] = await sc.wait_for_event("refused")
            logged = {kind: _access(sc, rid) for kind, (*_, rid) in replies.items()}

    expected = {
        "no route": (404, "no_route", "NR"),
        "connect failure": (503, "upstream_connect_failure", "UF"),
        "retries exhausted": (503, "upstream_connect_failure", "UF,URX"),
        "trips": (503, "upstream_connect_failure", "UF"),
        "breaker open": (503, "circuit_open", "UO"),
        "too large": (413, "payload_too_large", "IV"),
        "limit full": (503, "upstream_overflow", "UO"),
    }
    assert {kind: reply[:3] for kind, reply in replies.items()} == expected
    for kind, (status, _, flags, _) in replies.items():
        assert (logged[kind]["status"], logged[kind]["flags"]) == (status, flags), kind
    # the protocol-error path writes its reply with the same function
    head = raw.split(b"\r\n\r\n", 1)[0].decode().lower()
    assert head.startswith("http/1.1 400") and "\r\nx-pake-flags: dpe\r\n" in head + "\r\n"
    assert refused["flags"] == "DPE"
