"""How ``make bench`` judges its figures (bench.run.evaluate_targets), on measured entries."""

from __future__ import annotations

from typing import Any

from bench.run import MTLS_PATHS, PATHS, evaluate_targets


def entry(profile: str, path: str, cpu: float) -> dict[str, Any]:
    """A path's best-of-runs entry as ``best_runs`` makes it, one sidecar, no other load."""
    return {"profile": profile, "path": path, "kind": "sidecar", "hops": 1, "variant": "plain",
            "runs": 3, "rps": 1e6 / cpu, "cpu_us_per_req": cpu, "cpu_us_per_req_median": cpu,
            "other_load_cores": 0.0, "peak_rss_mb": 35.0}


def test_tracing_at_1pct_is_judged_on_tiny_and_only_shown_for_the_parent_sampled_profile() -> None:
    """The realistic profile's requests carry a sampled traceparent: at "1%" every one of them
    is traced (parent-based), so its cost is shown as information, not held to the 5% target."""
    best = {f"{p}/{path}": entry(p, path, cpu) for p in ("tiny", "realistic")
            for path, cpu in (("sidecar-1", 25.0), ("sidecar-1-trace-1", 30.0))}
    targets = {t["target"]: t for t in evaluate_targets(best, PATHS + MTLS_PATHS)}
    tiny = targets["tiny: tracing at 1%, extra CPU µs/req (median of 3 runs)"]
    assert (tiny["status"], tiny["value"], tiny["limit"]) == ("MISS", 20.0, 5.0)
    [realistic] = [t for t in targets.values() if t["target"].startswith("realistic: tracing at 1%")]
    assert realistic["status"] == "info" and realistic["value"] == 20.0
    assert "sampled traceparent" in realistic["target"]


def test_the_user_part_of_cpu_is_compared_with_haproxys_per_proxy() -> None:
    """CPU µs/req less its system part (the kernel's, alike for proxies making the same
    syscalls), per proxy: where a sidecar and HAProxy differ. Shown, not judged."""
    def measured(path: str, kind: str, hops: int, per_proxy: tuple[float, float]) -> dict[str, Any]:
        e = entry("tiny", path, per_proxy[0] * hops)
        e.update(kind=kind, hops=hops, proxies=[{"cpu_us_per_req": per_proxy[0], "system_us_per_req": per_proxy[1]}
                                                for _ in range(hops)])
        return e

    best = {f"tiny/{e['path']}": e for e in (
        measured("sidecar-1", "sidecar", 1, (16.0, 9.0)), measured("haproxy-1", "haproxy", 1, (12.0, 7.5)),
        measured("sidecar-2-mtls", "sidecar", 2, (20.0, 6.5)), measured("haproxy-2-mtls", "haproxy", 2, (14.0, 7.0)))}
    targets = {t["target"].split(" (")[0]: t for t in evaluate_targets(best, PATHS + MTLS_PATHS)}
    hop = targets["tiny: user CPU µs/req, one sidecar hop ÷ HAProxy one hop"]
    assert (hop["status"], hop["value"]) == ("info", round(7.0 / 4.5, 2))
    pair = targets["tiny: user CPU µs/req per sidecar ÷ per HAProxy, mTLS pair"]
    assert (pair["status"], pair["value"]) == ("info", round(13.5 / 7.0, 2))
    assert "(13.5 vs 7.0 µs)" in next(t["target"] for t in evaluate_targets(best, PATHS + MTLS_PATHS)
                                      if t["target"].startswith("tiny: user CPU µs/req per sidecar"))


def test_a_sidecars_own_memory_is_shown_beside_its_rss_without_tracing_or_churn() -> None:
    """RSS counts the pages of every library a sidecar maps, which the page cache shares
    between the sidecars of a host; what each one adds is its anonymous pages, shown per
    variant as the largest of its paths (tracing's and the churn test's apart, as for RSS)."""
    best = {}
    for path, variant, anonymous in (("sidecar-1", "plain", 20.5), ("sidecar-1-log", "plain", 21.25),
                                     ("sidecar-1-trace-1", "plain", 31.0), ("sidecar-2-mtls", "mtls", 26.0),
                                     ("sidecar-2-mtls-new", "mtls", 60.0)):
        e = entry("tiny", path, 20.0)
        e.update(variant=variant, anonymous_mb=anonymous)
        best[f"tiny/{path}"] = e
    own = {t["target"].split("'s own")[0]: t for t in evaluate_targets(best, PATHS + MTLS_PATHS)
           if "own memory" in t["target"]}
    assert {name: (t["value"], t["status"]) for name, t in own.items()} == {
        "plain sidecar": (21.25, "info"), "mTLS sidecar": (26.0, "info")}
