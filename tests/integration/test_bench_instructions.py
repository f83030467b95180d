"""`python -m bench.instructions` against the real sidecar under valgrind: the count is per
exchange (start-up and warm-up left out) and sees what an exchange costs.

Needs valgrind: CI installs it (.ci/run), so there a missing valgrind fails the test; elsewhere
it is skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import instructions

REPO = Path(__file__).resolve().parents[2]


def require_valgrind() -> None:
    """Fails (CI, which installs it) or skips (elsewhere) the test when valgrind is missing."""
    why = instructions.available()
    if why:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(why)


def count(out: Path, requests: int, *keys: str) -> tuple[dict[str, int], str]:
    """``bench.instructions`` for ``keys`` (PROFILE/PATH/PROXY): each count's instructions an
    exchange by key, and the table it printed. The realistic profile's headers are written
    into ``out``: the suite does not need ../shared."""
    script = out / "realistic.lua"
    script.write_text("".join(f'wrk.headers["x-header-{i}"] = "value {i} of a service-to-service call"\n'
                              for i in range(12)))
    path = out / f"{requests}.json"
    proc = subprocess.run([sys.executable, "-m", "bench.instructions", "--requests", str(requests),
                           "--warmup", "50", "--output", str(path), "--realistic-script", str(script),
                           *(f"--count={k}" for k in keys)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    counts = json.loads(path.read_text())["counts"]
    return {f"{c['profile']}/{c['path']}/{c['proxy']}": c["per_exchange"] for c in counts}, proc.stdout


@pytest.fixture(scope="module")
def counted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    require_valgrind()
    out = tmp_path_factory.mktemp("instructions")
    few, _ = count(out, 150, "tiny/sidecar-1/sidecar-b")
    many, table = count(out, 450, "tiny/sidecar-1/sidecar-b", "realistic/sidecar-1/sidecar-b")
    return {"few": few, "many": many, "table": table}


def test_the_count_is_per_exchange_not_start_up(counted: dict[str, Any]) -> None:
    few, many = counted["few"]["tiny/sidecar-1/sidecar-b"], counted["many"]["tiny/sidecar-1/sidecar-b"]
    # an exchange through one hop is tens of thousands of instructions; the start-up (hundreds
    # of millions) would show as 1M+ an exchange if it were counted
    assert 10_000 < few < 300_000
    # three times the requests, the same figure: nothing but exchanges is in it
    assert abs(many - few) / few < 0.03, (few, many)


def test_the_count_sees_what_an_exchange_costs(counted: dict[str, Any]) -> None:
    many = counted["many"]
    # the realistic profile's request has 12 header lines more, its response more headers and a
    # larger body
    assert many["realistic/sidecar-1/sidecar-b"] > 1.3 * many["tiny/sidecar-1/sidecar-b"]
    assert "realistic  sidecar-1  sidecar-b" in counted["table"]


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed")
def test_haproxy_is_counted_in_the_same_place_and_the_sidecar_shown_beside_it(tmp_path: Path) -> None:
    require_valgrind()
    counts, table = count(tmp_path, 150, "tiny/sidecar-1/sidecar-b", "tiny/haproxy-1/haproxy-1")
    sidecar, haproxy = counts["tiny/sidecar-1/sidecar-b"], counts["tiny/haproxy-1/haproxy-1"]
    # HAProxy's exchange is C only: thousands of instructions, fewer than the sidecar's
    assert 3_000 < haproxy < sidecar
    row = next(line for line in table.splitlines() if line.startswith("tiny") and "sidecar-b" in line)
    assert row.split()[-1] == f"{sidecar / haproxy:.2f}×"
