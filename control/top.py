"""`pakectl top`: the mesh's live traffic per service and per route, from the control plane's
``/api/stats`` (what the sidecars' stats messages add up to over its window), like
`linkerd viz stat`: req/s, success rate, p50/p95/p99, breaker state, and each service
against its SLO with the error budget left.

On a terminal the table is redrawn in place (cursor home, each line cleared to its end, the
rest of the screen cleared), so it does not scroll or flicker; otherwise each sample is
printed after the previous one. ``--json`` prints one sample. ``render`` is pure.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, TextIO

from sidecar.discovery.protocol import LATENCY_BUCKETS

__all__ = ["format_latency", "render", "run_top"]

HOME = "\x1b[H"
CLEAR_LINE = "\x1b[K"
CLEAR_BELOW = "\x1b[J"
CLEAR_SCREEN = "\x1b[2J"
MAX_DENIALS_SHOWN = 5


def format_latency(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= LATENCY_BUCKETS[-1]:
        return f"≥{LATENCY_BUCKETS[-1]:g}s"
    if seconds >= 1:
        return f"{seconds:.2f}s"
    ms = seconds * 1000
    return f"{ms:.1f}ms" if ms < 10 else f"{ms:.0f}ms"


def _percent(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio * 100:.2f}%"


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]


def _slo_cell(slo: dict[str, Any] | None) -> tuple[str, str]:
    if slo is None:
        return "-", "-"
    state = {"ok": "ok", "violated": "VIOLATED", "no_data": "no data"}[slo["state"]]
    if slo["state"] == "violated":
        failing = [o["name"] for o in slo["objectives"] if o["ok"] is False]
        state += f" ({', '.join(failing)})"
    budget = slo["budget_remaining"]
    return state, "-" if budget is None else f"{budget * 100:.0f}%"


def render(sample: dict[str, Any]) -> str:
    """The table for one sample of ``/api/stats``."""
    lines = [f"window {sample['window']:g}s  config version {sample.get('config_version')}  "
             f"at {sample.get('at', '')}", ""]
    slo = {s["service"]: s for s in sample.get("slo", [])}
    names = sorted({r["service"] for r in sample["services"]} | set(slo))
    traffic = {r["service"]: r for r in sample["services"]}
    rows = [("SERVICE", "REQ/S", "SUCCESS", "P50", "P95", "P99", "BREAKER", "SLO", "BUDGET")]
    for name in names:
        r = traffic.get(name)
        cells = ("0.0", "-", "-", "-", "-", "-") if r is None else (
            f"{r['rps']:.1f}", _percent(r["success_rate"]), format_latency(r["p50"]),
            format_latency(r["p95"]), format_latency(r["p99"]), r["breaker"])
        rows.append((name, *cells, *_slo_cell(slo.get(name))))
    lines += _table(rows) if names else ["(no traffic reported yet)"]
    if sample["routes"]:
        lines.append("")
        rows = [("ROUTE", "FROM", "TO", "REQ/S", "SUCCESS", "P50", "P95", "P99", "BREAKER")]
        for r in sample["routes"]:
            rows.append((r["route"], r["source"], r["destination"], f"{r['rps']:.1f}",
                         _percent(r["success_rate"]), format_latency(r["p50"]),
                         format_latency(r["p95"]), format_latency(r["p99"]), r["breaker"]))
        lines += _table(rows)
    denials = sample.get("denials", [])[:MAX_DENIALS_SHOWN]
    if denials:
        lines += ["", "RECENT DENIALS"]
        for d in denials:
            lines.append(f"  {d['service']}: {d['status']} {d['flag']} {d.get('method') or ''} "
                         f"{d.get('path') or ''} from {d.get('source') or '?'}: {d['reason']}")
    return "\n".join(lines) + "\n"


def run_top(fetch: Callable[[], dict[str, Any]], out: TextIO, *, as_json: bool, interval: float,
            count: int | None, sleep: Callable[[float], None] = time.sleep) -> int:
    """Print samples until ``count`` (None: until interrupted)."""
    if as_json:
        json.dump(fetch(), out, indent=2)
        out.write("\n")
        return 0
    in_place = out.isatty()
    shown = 0
    while count is None or shown < count:
        if shown:
            sleep(interval)
        text = render(fetch())
        if in_place:
            out.write((CLEAR_SCREEN if not shown else "") + HOME + text.replace("\n", CLEAR_LINE + "\n") + CLEAR_BELOW)
        else:
            out.write(("\n" if shown else "") + text)
        out.flush()
        shown += 1
    return 0
