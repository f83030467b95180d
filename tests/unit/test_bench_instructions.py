"""bench.instructions' reading of callgrind's dumps and its table (the counting itself runs
valgrind: tests/integration/test_bench_instructions.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import instructions
from bench.instructions import Count

# the head and tail of a real dump (callgrind 3.x), its cost lines cut
DUMP = """# callgrind format
version: 1
creator: callgrind-3.19.0
pid: 4242
cmd:  /usr/bin/python -m sidecar run -c sidecar.yaml
part: 1

desc: I1 cache:
positions: line
events: Ir
summary: 101612460

fl=(1) ???
fn=(1) 0x0000000000001000
0 3
totals: 101612460
"""


def test_the_total_is_the_dumps_summary(tmp_path: Path) -> None:
    dump = tmp_path / "callgrind.out.1"
    dump.write_text(DUMP)
    assert instructions.read_total(dump) == 101_612_460


def test_a_file_that_is_no_dump_is_an_error_naming_it(tmp_path: Path) -> None:
    half = tmp_path / "callgrind.out.1"
    half.write_text(DUMP.split("summary:")[0])  # cut before the summary: still being written
    with pytest.raises(ValueError, match="callgrind.out.1: no summary or totals line"):
        instructions.read_total(half)


def _results(*counts: tuple[Count, int]) -> dict[str, object]:
    return {"requests": 2000, "warmup": 300, "errors": [],
            "counts": [{"path": c.path, "sidecar": c.sidecar, "profile": c.profile, "per_exchange": n}
                       for c, n in counts]}


def test_the_table_shows_each_count_beside_the_baseline(tmp_path: Path) -> None:
    hop, policy = Count("sidecar-1", "sidecar-b", "tiny"), Count("sidecar-2-mtls-policy", "sidecar-b", "tiny")
    before = tmp_path / "results.json"
    # a bench.run results file: the counts under its "instructions" key
    before.write_text(json.dumps({"runs": [], "instructions": _results((hop, 50_000))}))
    text = instructions.render(_results((hop, 49_000), (policy, 98_300)), instructions.baseline_counts(before))
    lines = text.splitlines()
    assert "2000 requests on one connection after 300 uncounted" in lines[0]
    assert lines[2].split() == ["tiny", "sidecar-1", "sidecar-b", "49.0k", "50.0k", "→", "-2.0%"]
    # counted now, not in the baseline
    assert lines[3].split() == ["tiny", "sidecar-2-mtls-policy", "sidecar-b", "98.3k", "-"]


def test_a_count_that_failed_is_listed_with_why() -> None:
    results = _results()
    results["errors"] = [{"path": "sidecar-2-mtls", "sidecar": "sidecar-a", "profile": "tiny",
                          "error": "StartError: sidecar-a not ready after 120s:\n..."}]
    assert "failed: tiny/sidecar-2-mtls/sidecar-a: StartError: sidecar-a not ready after 120s" in \
        instructions.render(results)


@pytest.mark.parametrize("bad", ["tiny/sidecar-1", "huge/sidecar-1/sidecar-b", "tiny/nowhere/sidecar-b",
                                 "tiny/sidecar-1/sidecar-c"])
def test_a_count_is_profile_path_and_sidecar(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        instructions.main(["--count", bad])
    assert exit_.value.code == 2
    assert f"--count {bad}: want PROFILE/PATH/SIDECAR" in capsys.readouterr().err
