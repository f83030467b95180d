"""docs/metrics.md cannot go stale: each section's table must list exactly the metrics (name,
type, label names) that its process's /metrics serves once every metric has a sample.

A new section (the sidecar's) is one ``## <title>`` table in the doc and one entry in
SECTIONS: an async function that runs the process, makes every metric show a sample and
returns the /metrics text.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from control.server import ControlPlane, ServeOptions
from sidecar.discovery.protocol import Denial, RouteStats, Stats
from tests.integration.test_control_observability import MESH, admin, histogram, joined, send_stats

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
    out: dict[str, Row] = {}
    for family in text_string_to_metric_families(text):
        name = family.name + "_total" if family.type == "counter" else family.name
        labels = frozenset(k for s in family.samples for k in s.labels)
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


SECTIONS: dict[str, Callable[[Path], Awaitable[str]]] = {
    "Control plane": control_plane_metrics,
}


@pytest.mark.parametrize("title", sorted(SECTIONS))
async def test_the_metrics_table_matches_what_is_served(title: str, tmp_path: Path) -> None:
    documented = doc_table(title)
    actual = served(await SECTIONS[title](tmp_path))
    assert sorted(set(actual) - set(documented)) == [], "served but not in docs/metrics.md"
    assert sorted(set(documented) - set(actual)) == [], "in docs/metrics.md but not served"
    for name, row in documented.items():
        assert actual[name] == row, f"{name}: docs say {row}, /metrics serves {actual[name]}"
