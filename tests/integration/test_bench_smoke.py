"""`python -m bench.run` end to end in a tiny mode, against the real sidecar (and HAProxy if installed).

One harness run (1 s of wrk per path, 0.5 s of open loop, the tiny profile) over a selection of
paths: the plain ones, the access log to a file, tracing at 1%, and issue 11's mTLS pair with
an RBAC policy (beside HAProxy's mTLS pair); the cost paths twice (``--cost-runs 2``). The tests below check that each path was measured
and showed what it measures (the policy enforced and audited, the log lines written), and that
the targets a user reads are there; not what the numbers are.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.run import HOT_PATH, MICRO

REPO = Path(__file__).resolve().parents[2]
PATHS = ["direct", "sidecar-1", "sidecar-2", "sidecar-1-log", "sidecar-1-trace-1", "haproxy-1", "haproxy-2",
         "sidecar-2-mtls-policy", "haproxy-2-mtls"]
needs_haproxy = pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed")


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("bench") / "results.json"
    cmd = [sys.executable, "-m", "bench.run", "--quick", "--duration", "1", "--warmup", "0",
           "--profiles", "tiny", "--rate", "200", "--open-loop-duration", "0.5", "--paths", ",".join(PATHS),
           "--cost-runs", "2",
           "--output", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text()), proc.stdout


@pytest.fixture(scope="module")
def results(bench: tuple[dict[str, Any], str]) -> dict[str, Any]:
    return bench[0]


def runs_by_path(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each path's first run (a cost path's second has no open loop)."""
    return {run["path"]: run for run in results["runs"] if run["run"] == 1}


def targets(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["target"]: t for t in results["targets"]}


def test_every_sidecar_path_measured(results: dict[str, Any]) -> None:
    assert results["errors"] == []
    assert results["machine"]["nproc"] >= 1 and results["machine"]["python"]
    runs = runs_by_path(results)
    sidecar_paths = ("sidecar-1", "sidecar-2", "sidecar-1-log", "sidecar-1-trace-1", "sidecar-2-mtls-policy")
    for path in ("direct", *sidecar_paths):
        run = runs[path]
        assert run["closed_loop"]["rps"] > 0, path
        assert run["closed_loop"]["errors"] == 0, path
        assert run["open_loop"]["completed"] > 0 and run["open_loop"]["errors"] == 0, path
    assert [p["kind"] for p in runs["sidecar-1"]["proxies"]] == ["sidecar"]
    assert [p["kind"] for p in runs["sidecar-2"]["proxies"]] == ["sidecar", "sidecar"]
    for run in (runs[path] for path in sidecar_paths):
        for proxy in run["proxies"]:
            assert proxy["cpu_us_per_req"] > 0
            assert 0 <= proxy["system_us_per_req"] <= proxy["cpu_us_per_req"]
            assert proxy["peak_rss_mb"] > 0
            assert 0 < proxy["anonymous_after_load_mb"] < proxy["rss_after_load_mb"]
            # the traffic went through the sidecar, which counted it (metrics on)
            assert proxy["metrics_requests_total"] >= run["closed_loop"]["requests"]
    assert results["best"]["tiny/sidecar-1"]["added_p99_ms_per_hop"] is not None


def test_a_cost_path_is_measured_again_after_every_path_without_the_open_loop(
        results: dict[str, Any]) -> None:
    """A cost of a few % (the access log's, tracing's) is below one run's spread: each path it
    is judged by runs ``--cost-runs`` times, its later runs after every path's first (another
    spell of the machine), closed loop only; the target takes the median CPU of the runs."""
    order = [(run["path"], run["run"]) for run in results["runs"]]
    cost = ("sidecar-1", "sidecar-1-log", "sidecar-1-trace-1")
    first = [path for path, rep in order if rep == 1]  # (HAProxy's paths only where it is installed)
    assert [path for path in first if not path.startswith("haproxy")] == [
        path for path in PATHS if not path.startswith("haproxy")]
    assert order == [(path, 1) for path in first] + [(path, 2) for path in cost]
    for path in cost:
        again = next(run for run in results["runs"] if run["path"] == path and run["run"] == 2)
        assert again["closed_loop"]["rps"] > 0 and again["closed_loop"]["errors"] == 0
        assert "open_loop" not in again
        assert results["best"][f"tiny/{path}"]["runs"] == 2
    cpu = sorted(sum(p["cpu_us_per_req"] for p in run["proxies"])
                 for run in results["runs"] if run["path"] == "sidecar-1-log")
    assert results["best"]["tiny/sidecar-1-log"]["cpu_us_per_req_median"] == pytest.approx(sum(cpu) / 2, abs=0.1)
    assert results["best"]["tiny/sidecar-2"]["runs"] == 1


def test_micro_benchmarks_ran(results: dict[str, Any]) -> None:
    """Each micro-benchmark ran to its end against this checkout's code: a hot-path harness
    left behind by a change to what it builds shows here, not in the next ``make bench``."""
    micro = results["micro"]
    assert set(micro) == set(MICRO)
    failed = {name: text for name, text in micro.items() if text.startswith("failed")}
    assert failed == {}
    assert "µs of Python per exchange" in micro[HOT_PATH]


def test_policy_path_enforced_audited_and_logged(bench: tuple[dict[str, Any], str]) -> None:
    results, stdout = bench
    run = runs_by_path(results)["sidecar-2-mtls-policy"]
    checks, requests = run["checks"], run["closed_loop"]["requests"]
    assert run["variant"] == "mtls" and len(run["proxies"]) == 2
    assert checks["inbound_tls"].startswith("TLS")
    # checked before the load: an identity no rule allows is refused, the caller is served
    assert "service/intruder -> 403" in checks["policy"] and "service/front -> 200" in checks["policy"]
    # after it: every decision audited, every request logged on both sides, none dropped
    audit = checks["audit, sidecar B"]
    assert audit["decisions"] >= requests and audit["written"] == audit["decisions"] and audit["dropped"] == 0
    for side in ("A", "B"):
        log = checks[f"access log, sidecar {side}"]
        assert log["lines"] >= requests and log["dropped"] == 0
    assert "tiny/sidecar-2-mtls-policy: policy: spiffe://" in stdout


def test_access_log_path_writes_a_line_per_request(results: dict[str, Any]) -> None:
    run = runs_by_path(results)["sidecar-1-log"]
    log = run["checks"]["access log"]
    assert log["lines"] >= run["closed_loop"]["requests"] and log["dropped"] == 0


def test_targets_a_user_reads(bench: tuple[dict[str, Any], str]) -> None:
    results, stdout = bench
    names = targets(results)
    for name in ("tiny: access log to a file, extra CPU µs/req of one hop (median of 2 runs)",
                 "tiny: tracing at 1%, extra CPU µs/req (median of 2 runs)",
                 "plain sidecar peak RSS under load (VmHWM, any plain path without tracing)",
                 "mTLS sidecar peak RSS under load (VmHWM, sidecar-2-mtls and -policy)"):
        assert names[name]["status"] in ("PASS", "MISS"), name
        assert name in stdout
    own = ("plain sidecar's own memory after load (anonymous pages; RSS adds library pages shared "
           "between processes)")
    assert names[own]["status"] == "info" and 0 < names[own]["value"] < names[
        "plain sidecar peak RSS under load (VmHWM, any plain path without tracing)"]["value"]
    assert own in stdout
    assert "targets:" in stdout and "checks" in stdout


@needs_haproxy
def test_haproxy_paths_measured(results: dict[str, Any]) -> None:
    runs = runs_by_path(results)
    for path, hops in (("haproxy-1", 1), ("haproxy-2", 2), ("haproxy-2-mtls", 2)):
        run = runs[path]
        assert run["closed_loop"]["rps"] > 0, path
        assert len(run["proxies"]) == hops
        assert all(p["cpu_us_per_req"] > 0 for p in run["proxies"])
    names = targets(results)
    assert names["tiny: one sidecar hop ÷ HAProxy one hop, req/s"]["status"] in ("PASS", "MISS")
    policy = "tiny: two-sidecar mTLS + RBAC, audit and access logs on ÷ HAProxy mTLS pair, req/s"
    assert names[policy]["status"] in ("PASS", "MISS")
