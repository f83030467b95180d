"""`pakectl top`'s table: what it shows, and redrawing in place on a terminal."""

from __future__ import annotations

import io
from typing import Any

from control.top import format_latency, render, run_top

SAMPLE: dict[str, Any] = {
    "window": 60.0, "config_version": 3, "at": "2026-01-01T00:00:00+00:00",
    "services": [{"service": "orders", "rps": 12.5, "success_rate": 0.995, "p50": 0.004,
                  "p95": 0.25, "p99": 1.5, "breaker": "open 1/2"}],
    "routes": [{"route": "to-orders", "source": "frontend", "destination": "orders", "rps": 12.5,
                "success_rate": 0.995, "p50": 0.004, "p95": 0.25, "p99": 1.5, "breaker": "closed"}],
    "slo": [{"service": "orders", "state": "violated", "budget_remaining": -0.5,
             "objectives": [{"name": "p95", "ok": False}, {"name": "availability", "ok": True}]},
            {"service": "cart", "state": "no_data", "budget_remaining": None, "objectives": []}],
    "denials": [{"service": "orders", "status": 403, "flag": "RBAC", "method": "GET", "path": "/x",
                 "source": "spiffe://pake.local/service/gateway", "reason": "no rule allows"}],
}


def test_the_table_shows_services_routes_slos_and_denials() -> None:
    text = render(SAMPLE)
    lines = text.splitlines()
    [orders] = [line for line in lines if line.startswith("orders")]
    assert orders.split()[:7] == ["orders", "12.5", "99.50%", "4.0ms", "250ms", "1.50s", "open"]
    assert orders.endswith("VIOLATED (p95)  -50%")
    [cart] = [line for line in lines if line.startswith("cart")]
    assert "no data" in cart
    assert any(line.startswith("to-orders") and "frontend" in line for line in lines)
    assert "orders: 403 RBAC GET /x from spiffe://pake.local/service/gateway: no rule allows" in text
    assert format_latency(None) == "-" and format_latency(31.0) == "≥30s"


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_is_redrawn_in_place() -> None:
    out = Tty()
    naps: list[float] = []
    run_top(lambda: SAMPLE, out, as_json=False, interval=2.0, count=2, sleep=naps.append)
    text = out.getvalue()
    assert text.startswith("\x1b[2J\x1b[H") and text.count("\x1b[H") == 2
    assert text.count("\x1b[2J") == 1 and naps == [2.0]
    assert "\x1b[K\n" in text and text.endswith("\x1b[J")
