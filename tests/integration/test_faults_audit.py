"""The fault suite (issue 12): the audit sink's disk is full. A real gateway sidecar whose audit
file is a link to ``/dev/full`` (every write fails with ENOSPC, as on a full disk; no root,
no tmpfs): traffic flows, every lost record is counted in ``pake_audit_records{fate=
"write_error"}``, a warning says so, and the sink is not "rotated" away from the device.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp

from tests.helpers.flaky_upstream import FlakyUpstream
from tests.helpers.sidecar_process import SidecarProcess

REQUESTS = 100
POLICY = {"default": "deny", "rules": [{"name": "everyone", "allow": {"paths": ["/**"]}}]}


def metric(text: str, name: str) -> float:
    return next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


async def test_a_full_audit_disk_loses_records_counted_and_no_request(tmp_path: Path) -> None:
    sink = tmp_path / "audit.log"
    os.symlink("/dev/full", sink)
    async with FlakyUpstream() as app:
        boot = {"service": "gateway", "mode": "gateway",
                "listeners": {"gateway": "127.0.0.1:0", "admin": "127.0.0.1:0"},
                # 4 KiB: the smallest rotation size, passed within the first few dozen records
                "audit": {"path": str(sink), "max_size": "4KiB", "keep": 1, "warn_interval": "1h"}}
        mesh = {"services": {"gateway": {"policy": POLICY, "routes": [{"to": [{"service": "app"}]}]},
                             "app": {"endpoints": [app.address]}}}
        async with SidecarProcess(tmp_path, bootstrap=boot, mesh=mesh) as sc, \
                aiohttp.ClientSession() as http:
            statuses = []
            for i in range(REQUESTS):
                async with http.get(sc.url("gateway") + f"/orders/{i}") as r:
                    await r.read()
                    statuses.append(r.status)
            [warning] = await sc.wait_for_event("log_write_failed")
            async with http.get(sc.admin + "/metrics") as r:
                text = await r.text()
            lost = metric(text, 'pake_audit_records_total{fate="write_error"}')
            async with asyncio.timeout(5):
                while lost < REQUESTS:  # the writer thread may still hold the last batch
                    await asyncio.sleep(0.05)
                    async with http.get(sc.admin + "/metrics") as r:
                        lost = metric(await r.text(), 'pake_audit_records_total{fate="write_error"}')

    assert statuses == [200] * REQUESTS and len(app.requests) == REQUESTS
    assert lost == REQUESTS  # one authz decision per request, each counted as lost
    assert metric(text, 'pake_audit_records_total{fate="written"}') == 0
    assert "No space left on device" in warning["error"]
    # still the link to the device: a full disk is not a reason to rename the sink
    assert sink.is_symlink() and os.readlink(sink) == "/dev/full"
    assert not sink.with_name("audit.log.1").exists()
