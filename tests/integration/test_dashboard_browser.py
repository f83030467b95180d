"""The dashboard in a real browser: headless Chromium (Debian's ``chromium``) driven by
Playwright, against the control plane in-process with sidecar-like clients over mTLS. It
asserts what a person sees: the services as nodes, an edge once stats arrive, a denial once a
stats message carries one, a trace's waterfall; a screenshot is kept in the test's tmp dir.

Needs ``apt-get install -y chromium`` and ``pip install playwright`` (never ``playwright
install``: the system's Chromium is used). Skipped with the reason when either is missing,
except under CI, where it fails instead.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from control.server import ControlPlane, ServeOptions
from sidecar.discovery.protocol import Denial, RouteStats, Stats
from tests.integration.test_control_observability import (
    MESH,
    admin,
    export_spans,
    histogram,
    joined,
    send_stats,
)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run"]


def _missing() -> str | None:
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright)"
    if not Path(CHROMIUM).exists():
        return "chromium is not installed (apt-get install -y chromium)"
    return None


@pytest.fixture
def browser_ready() -> None:
    reason = _missing()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the browser test must run in CI: {reason}")
        pytest.skip(reason)


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[ControlPlane]:
    opts = ServeOptions(state_dir=tmp_path / "state", listen=("127.0.0.1", 0),
                        admin=("127.0.0.1", 0), otlp=("127.0.0.1", 0))
    plane = await ControlPlane.open(opts)
    plane.observability.refresh_period = 0.2  # the page updates within a blink
    await plane.start()
    yield plane
    await plane.stop()


async def test_dashboard_shows_the_mesh_live(browser_ready: None, plane: ControlPlane,
                                             tmp_path: Path) -> None:
    from playwright.async_api import async_playwright, expect

    status, _ = await admin(plane, "/v1/config", "POST", {"mesh": MESH})
    assert status == 200
    frontend = await joined(plane, tmp_path, "frontend")
    orders = await joined(plane, tmp_path, "orders")
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[Any] = []
            page.on("pageerror", lambda exc: errors.append(exc))
            await page.goto(f"http://127.0.0.1:{plane.ports['admin']}/")
            await expect(page.locator("#live")).to_have_text("live")
            # every service of the config is a node, each with its sidecars' health
            for name in ("frontend", "gateway", "orders"):
                await expect(page.locator(f'#graph .node[data-service="{name}"]')).to_be_visible()
            await expect(page.locator('#graph .node[data-service="orders"] .sub')).to_have_text(
                "1/1 healthy")
            await expect(page.locator("#graph .edge")).to_have_count(0)
            await expect(page.locator("#sidecars tbody tr")).to_have_count(2)

            await send_stats(plane, frontend, Stats(interval=5.0, routes=(
                RouteStats(route="to-orders", destination="orders", requests=200, errors=2,
                           latency=histogram(ms5=150, ms50=50)),)))
            edge = page.locator('#graph .edge[data-source="frontend"][data-destination="orders"]')
            await expect(edge).to_be_visible()
            await expect(edge.locator("text")).to_contain_text("99.00% · p99 ")
            await expect(page.locator('#services tr[data-service="orders"]')).to_contain_text("99.00%")

            await send_stats(plane, orders, Stats(interval=5.0, denials=(Denial(
                at=1_700_000_000.0, reason="no rule allows spiffe://pake.local/service/gateway",
                source="spiffe://pake.local/service/gateway", method="DELETE",
                path="/orders/<script>alert(1)</script>"),)))
            denial = page.locator("#denials tr.denial")
            await expect(denial).to_have_count(1)
            await expect(denial).to_contain_text("no rule allows spiffe://pake.local/service/gateway")
            # a path from a stranger is shown as text, never run as HTML
            await expect(denial).to_contain_text("DELETE /orders/<script>alert(1)</script>")

            trace_id = await asyncio.to_thread(
                export_spans, f"http://127.0.0.1:{plane.ports['otlp']}")
            await expect(page.locator(f'#traces li[data-trace="{trace_id}"]')).to_be_visible()
            await expect(page.locator("#waterfall .span-row")).to_have_count(3)
            await expect(page.locator("#waterfall .span-row").first).to_contain_text("GET /orders")

            shot = tmp_path / "dashboard.png"
            await page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            assert errors == []
        finally:
            await browser.close()
    await frontend.close()
    await orders.close()
