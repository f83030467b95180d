"""`python -m bench.fanout` end to end with N=5: a real `pakectl serve`, five simulated sidecars
that join and stream over mTLS, two route changes, the stream-bound probe.

It checks the results JSON has every field with sane values (all acked, p50 <= p99 <= max,
CPU and RSS measured, the extra streams refused with 503 too_many_streams and the others still
connected), not how fast the numbers are.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("bench") / "results.json"
    out.write_text(json.dumps({"runs": ["kept"]}))  # what the proxy benchmark wrote stays
    cmd = [sys.executable, "-m", "bench.fanout", "--sizes", "5", "--changes", "2", "--extra", "2",
           "--output", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text()), proc.stdout


def test_every_sidecar_acked_each_change(run: tuple[dict[str, Any], str]) -> None:
    results, stdout = run
    assert results["runs"] == ["kept"]
    [size] = results["fanout"]["runs"]
    assert size["sidecars"] == 5 and size["workers"] == 1
    assert [c["version"] for c in size["changes"]] == [2, 3]
    for change in size["changes"]:
        assert change["acked"] == 5 and change["missing"] == 0 and change["closed"] == []
        assert 0 < change["p50_ms"] <= change["p99_ms"] <= change["max_ms"] < 30_000
        # (no order between them: the push starts on the store's change, so every sidecar
        # may ack before the apply's own answer is back)
        assert change["apply_ms"] > 0
        assert change["snapshot_bytes"] > 0
        assert change["control_plane_cpu_s"] >= 0
    cp = size["control_plane"]
    assert 0 < cp["rss_idle_mb"] <= cp["peak_rss_mb"] and cp["rss_after_mb"] > 0
    assert cp["cpu_s_total"] > 0
    assert size["setup"]["join_s"] > 0
    assert "push fan-out" in stdout and "joined 7/7" in stdout and "connected 5/5" in stdout


def test_streams_past_the_bound_are_refused_clearly(run: tuple[dict[str, Any], str]) -> None:
    [size] = run[0]["fanout"]["runs"]
    bound = size["stream_bound"]
    assert bound["max_streams"] == 5 and bound["attempted"] == 2 and bound["refused"] == 2
    assert bound["status"] == 503 and bound["error"] == "too_many_streams"
    assert "--max-streams" in bound["detail"]
    assert bound["connected_after"] == 5
