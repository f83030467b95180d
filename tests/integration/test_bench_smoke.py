"""`python -m bench.run` end to end in a tiny mode, against the real sidecar (and HAProxy if installed).

One harness run (1 s of wrk per path, 0.5 s of open loop) shared by the tests below; it checks
the results JSON has a measurement for every path, not what the numbers are.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench") / "results.json"
    cmd = [sys.executable, "-m", "bench.run", "--quick", "--duration", "1", "--warmup", "0",
           "--profiles", "tiny", "--rate", "200", "--open-loop-duration", "0.5", "--output", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "targets:" in proc.stdout
    return json.loads(out.read_text())


def runs_by_path(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {run["path"]: run for run in results["runs"]}


def test_every_sidecar_path_measured(results: dict[str, Any]) -> None:
    assert results["errors"] == []
    assert results["machine"]["nproc"] >= 1 and results["machine"]["python"]
    runs = runs_by_path(results)
    for path in ("direct", "sidecar-1", "sidecar-2"):
        run = runs[path]
        assert run["closed_loop"]["rps"] > 0, path
        assert run["closed_loop"]["errors"] == 0, path
        assert run["open_loop"]["completed"] > 0 and run["open_loop"]["errors"] == 0, path
    assert [p["kind"] for p in runs["sidecar-1"]["proxies"]] == ["sidecar"]
    assert [p["kind"] for p in runs["sidecar-2"]["proxies"]] == ["sidecar", "sidecar"]
    for run in (runs["sidecar-1"], runs["sidecar-2"]):
        for proxy in run["proxies"]:
            assert proxy["cpu_us_per_req"] > 0
            assert proxy["peak_rss_mb"] > 0
            # the traffic went through the sidecar, which counted it (metrics on)
            assert proxy["metrics_requests_total"] >= run["closed_loop"]["requests"]
    assert results["best"]["tiny/sidecar-1"]["added_p99_ms_per_hop"] is not None
    assert any(t["target"].startswith("sidecar peak RSS") for t in results["targets"])


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed")
def test_haproxy_paths_measured(results: dict[str, Any]) -> None:
    runs = runs_by_path(results)
    for path, hops in (("haproxy-1", 1), ("haproxy-2", 2)):
        run = runs[path]
        assert run["closed_loop"]["rps"] > 0, path
        assert len(run["proxies"]) == hops
        assert all(p["cpu_us_per_req"] > 0 for p in run["proxies"])
    assert any("HAProxy one hop" in t["target"] for t in results["targets"])
