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


def test_the_total_is_the_dumps_totals(tmp_path: Path) -> None:
    dump = tmp_path / "callgrind.out.1"
    dump.write_text(DUMP)
    assert instructions.read_total(dump) == 101_612_460


def test_a_dump_still_being_written_is_an_error_naming_it(tmp_path: Path) -> None:
    half = tmp_path / "callgrind.out.1"
    half.write_text(DUMP.split("totals:")[0])  # its header's summary there, the rest not yet
    with pytest.raises(ValueError, match="callgrind.out.1: no totals line: not a whole callgrind dump"):
        instructions.read_total(half)


def _results(*counts: tuple[Count, int]) -> dict[str, object]:
    return {"requests": 2000, "warmup": 300, "errors": [],
            "counts": [{"path": c.path, "proxy": c.proxy, "profile": c.profile, "per_exchange": n}
                       for c, n in counts]}


def test_the_table_shows_each_count_beside_the_baseline(tmp_path: Path) -> None:
    hop, policy = Count("sidecar-1", "sidecar-b", "tiny"), Count("sidecar-2-mtls-policy", "sidecar-b", "tiny")
    before = tmp_path / "results.json"
    # a bench.run results file: the counts under its "instructions" key
    before.write_text(json.dumps({"runs": [], "instructions": _results((hop, 50_000))}))
    text = instructions.render(_results((hop, 49_000), (policy, 98_300)), instructions.baseline_counts(before))
    lines = text.splitlines()
    assert "2000 requests on one connection after 300 uncounted" in lines[0]
    assert lines[1].split() == ["profile", "path", "proxy", "instructions", "×", "HAProxy", "vs", "baseline"]
    # no HAProxy counted: its column is empty
    assert lines[2].split() == ["tiny", "sidecar-1", "sidecar-b", "49.0k", "50.0k", "→", "-2.0%"]
    # counted now, not in the baseline
    assert lines[3].split() == ["tiny", "sidecar-2-mtls-policy", "sidecar-b", "98.3k", "-"]


def test_a_sidecar_is_shown_beside_the_haproxy_doing_its_job() -> None:
    counts = [(Count("sidecar-2-mtls", "sidecar-b", "tiny"), 78_800), (Count("sidecar-2-mtls", "sidecar-a", "tiny"), 73_400),
              (Count("haproxy-2-mtls", "haproxy-2", "tiny"), 42_900),
              (Count("haproxy-2-mtls", "haproxy-1", "realistic"), 60_000)]
    lines = instructions.render(_results(*counts)).splitlines()
    # B terminates mTLS as HAProxy's second hop does
    assert lines[2].split() == ["tiny", "sidecar-2-mtls", "sidecar-b", "78.8k", "1.84×"]
    # A's counterpart (the first hop) was counted on the other profile only: no ratio
    assert lines[3].split() == ["tiny", "sidecar-2-mtls", "sidecar-a", "73.4k"]
    assert lines[4].split() == ["tiny", "haproxy-2-mtls", "haproxy-2", "42.9k"]


def test_a_count_that_failed_is_listed_with_why() -> None:
    results = _results()
    results["errors"] = [{"path": "sidecar-2-mtls", "proxy": "sidecar-a", "profile": "tiny",
                          "error": "StartError: sidecar-a not ready after 120s:\n..."}]
    assert "failed: tiny/sidecar-2-mtls/sidecar-a: StartError: sidecar-a not ready after 120s" in \
        instructions.render(results)


@pytest.mark.parametrize("bad", ["tiny/sidecar-1", "huge/sidecar-1/sidecar-b", "tiny/nowhere/sidecar-b",
                                 "tiny/sidecar-1/sidecar-c", "tiny/haproxy-1/haproxy-3"])
def test_a_count_is_profile_path_and_proxy(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        instructions.main(["--count", bad])
    assert exit_.value.code == 2
    assert f"--count {bad}: want PROFILE/PATH/PROXY" in capsys.readouterr().err


def test_every_count_names_a_proxy_its_path_starts() -> None:
    from bench import run
    paths = run.PATH_SPECS
    for count in instructions.COUNTS:
        spec = paths[count.path]
        names = {"sidecar": ["sidecar-b"] if spec.hops == 1 else ["sidecar-a", "sidecar-b"],
                 "haproxy": [f"haproxy-{i}" for i in range(1, spec.hops + 1)]}[spec.kind]
        assert count.proxy in names, count
    for (path, proxy), reference in instructions.REFERENCE.items():
        assert paths[reference[0]].kind == "haproxy" and paths[path].hops == paths[reference[0]].hops


def test_a_baseline_without_counts_is_refused_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"runs": [], "targets": []}))  # a bench run without the counting step
    with pytest.raises(SystemExit) as exit_:
        instructions.main(["--baseline", str(old), "--count", "tiny/sidecar-1/sidecar-b"])
    assert exit_.value.code == 2
    assert f"--baseline {old}: no instruction counts in it" in capsys.readouterr().err


def test_a_count_whose_path_cannot_run_here_is_skipped_saying_why(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import haproxy
    monkeypatch.setattr(haproxy, "available", lambda: False)  # a machine without HAProxy
    said: list[str] = []
    results = instructions.run_counts([Count("haproxy-1", "haproxy-1", "tiny")], requests=10, warmup=0,
                                      script=Path("unused.lua"), log=said.append)
    assert results["counts"] == [] and results["errors"] == []
    assert results["skipped"] == [{"path": "haproxy-1", "proxy": "haproxy-1", "profile": "tiny",
                                   "reason": "haproxy is not installed"}]
    assert said == ["[instructions 1/1] tiny/haproxy-1/haproxy-1: skipped, haproxy is not installed"]
    assert "skipped: tiny/haproxy-1/haproxy-1: haproxy is not installed" in instructions.render(results)


def test_a_realistic_count_without_its_wrk_script_is_refused(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "realistic.lua"
    with pytest.raises(SystemExit) as exit_:
        instructions.main(["--count", "realistic/sidecar-1/sidecar-b", "--realistic-script", str(missing)])
    assert exit_.value.code == 2
    assert f"{missing}: the realistic profile's wrk script is missing" in capsys.readouterr().err
