"""``python -m bench.instructions``: instructions an exchange costs one proxy of a bench path
(a sidecar, or HAProxy in the same place), counted by callgrind.

req/s and CPU µs on a shared 2-core machine move by ±10% between identical runs, so a change
of 1-4% cannot be judged from them. An instruction count can: the same code counts within
0.1% from run to run. For each ``Count``, the path's processes start as ``bench.run`` starts
them, with one proxy under ``valgrind --tool=callgrind --instr-atstart=no`` (so start-up runs
uncounted and quicker). One keep-alive connection sends ``--warmup`` requests, then counting is
switched on (``callgrind_control -i on``), ``--requests`` requests are sent one at a time, and
the counts are dumped (``callgrind_control -d``). Every thread of the proxy counts (the log
writer's included). The kernel's share is not counted, nor the other processes'.

HAProxy counted where a sidecar sits gives the "× HAProxy" column: the user-space CPU ratio
of issue 11, without the noise. ``make bench`` runs it when valgrind is installed
(``apt-get install -y valgrind``) and prints the table; ``--baseline results.json`` (a previous
run's, or ``bench/results.json``) adds how each count moved. Counting slows a proxy ~50x: the
default counts take ~50 s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from .loadgen import build_request, lua_headers, requests_in_turn
from .procs import Processes, StartError

__all__ = ["COUNTS", "Count", "PROXIES", "REFERENCE", "available", "baseline_counts", "count_one", "main",
           "read_total", "render", "run_counts"]


@dataclass(frozen=True)
class Count:
    """One figure: a bench path, the proxy in it that is counted, a traffic profile."""

    path: str  # a bench path key (bench/run.py)
    # "sidecar-a" (outbound), "sidecar-b" (inbound; the one of a one-hop path); HAProxy's hops
    # by their place: "haproxy-1" (the first: originates mTLS), "haproxy-2" (terminates it)
    proxy: str
    profile: str  # tiny / realistic

    @property
    def key(self) -> str:
        return f"{self.profile}/{self.path}/{self.proxy}"


PROXIES = ("sidecar-a", "sidecar-b", "haproxy-1", "haproxy-2")

# one plain hop on both profiles, and with its access log to a file (the log writer's thread
# counts too); both sides of the mTLS pair; the inbound side with RBAC, audit and access logs
# (the policy path's extra cost is all on B but A's access log); HAProxy in the same places
COUNTS = (
    Count("sidecar-1", "sidecar-b", "tiny"),
    Count("sidecar-1", "sidecar-b", "realistic"),
    Count("sidecar-1-log", "sidecar-b", "tiny"),
    Count("sidecar-2-mtls", "sidecar-a", "tiny"),
    Count("sidecar-2-mtls", "sidecar-b", "tiny"),
    Count("sidecar-2-mtls-policy", "sidecar-b", "tiny"),
    Count("haproxy-1", "haproxy-1", "tiny"),
    Count("haproxy-1", "haproxy-1", "realistic"),
    Count("haproxy-2-mtls", "haproxy-1", "tiny"),
    Count("haproxy-2-mtls", "haproxy-2", "tiny"),
)

# the HAProxy doing a sidecar's job, for the "× HAProxy" column (it adds no headers, logs
# nothing and enforces no policy: the ratio is what all of that and Python cost together)
REFERENCE = {
    ("sidecar-1", "sidecar-b"): ("haproxy-1", "haproxy-1"),
    ("sidecar-1-log", "sidecar-b"): ("haproxy-1", "haproxy-1"),
    ("sidecar-2-mtls", "sidecar-a"): ("haproxy-2-mtls", "haproxy-1"),
    ("sidecar-2-mtls", "sidecar-b"): ("haproxy-2-mtls", "haproxy-2"),
    ("sidecar-2-mtls-policy", "sidecar-b"): ("haproxy-2-mtls", "haproxy-2"),
}

# under callgrind a sidecar starts in ~2-5 s; a loaded machine can take several times that
START_TIMEOUT = 120.0


def available() -> str | None:
    """Why counting cannot run here, or None."""
    missing = [tool for tool in ("valgrind", "callgrind_control") if shutil.which(tool) is None]
    return f"{' and '.join(missing)} not installed (apt-get install -y valgrind)" if missing else None


def read_total(dump: Path) -> int:
    """The instructions (Ir) a whole callgrind dump holds: its ``totals:`` line, which callgrind
    writes last (the ``summary:`` in its header is the same figure, there before the rest)."""
    for line in reversed(dump.read_text(errors="replace").splitlines()):
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise ValueError(f"{dump}: no totals line: not a whole callgrind dump")


def _control(*args: str) -> None:
    done = subprocess.run(["callgrind_control", *args], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"callgrind_control {' '.join(args)} failed: {(done.stderr or done.stdout).strip()}")


def _dumped(out: Path, timeout: float = 60.0) -> Path:
    """The dump ``callgrind_control -d`` asked for: ``<out>.1``, once callgrind has written it."""
    dump = out.with_name(out.name + ".1")
    deadline = time.monotonic() + timeout
    while True:
        try:
            read_total(dump)  # whole: the totals line is written last
            return dump
        except (OSError, ValueError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"callgrind wrote no dump to {dump} in {timeout:.0f} s") from None
            time.sleep(0.2)


def count_one(count: Count, *, requests: int, warmup: int, script: Path, workdir: Path,
              keep: Path | None = None) -> dict[str, Any]:
    """Start the path with ``count.proxy`` under callgrind; the instructions of ``requests``
    exchanges on one connection, after ``warmup`` uncounted ones. ``keep``: a directory to
    copy the dump into, for ``callgrind_annotate``."""
    from . import run  # here: bench.run imports this module for `make bench`

    spec = run.PATH_SPECS[count.path]
    out = workdir / "callgrind.out"
    # PYTHONHASHSEED fixed: a dict's probes depend on the string hashes, a few hundred
    # instructions an exchange that would otherwise differ from run to run
    wrap = ["env", "PYTHONHASHSEED=0", "valgrind", "--tool=callgrind", "--instr-atstart=no",
            "--dump-instr=no", f"--callgrind-out-file={out}"]
    headers = lua_headers(script) if count.profile == "realistic" else []
    procs = Processes(workdir)
    try:
        _, upstream_port = run.start_upstream(procs, count.profile)
        ctx = run.Ctx(procs, workdir, upstream_port, {"root": workdir}, wrap={count.proxy: wrap},
                      start_timeout=START_TIMEOUT)
        started = spec.start(ctx)
        counted = next((p for p in started.proxies if p.proc.name == count.proxy), None)
        if counted is None:
            raise ValueError(f"the path {count.path} has no {count.proxy}")
        request = build_request(started.port, headers)
        with socket.create_connection(("127.0.0.1", started.port), timeout=60) as sock:
            requests_in_turn([sock], request, warmup)
            _control("-i", "on", str(counted.proc.pid))
            t0 = time.monotonic()
            requests_in_turn([sock], request, requests)
            took = time.monotonic() - t0
            _control("-d", str(counted.proc.pid))
        dump = _dumped(out)
        total = read_total(dump)
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(dump, keep / f"{count.profile}-{count.path}-{count.proxy}.callgrind")
    finally:
        procs.stop_all()
    return {**asdict(count), "requests": requests, "warmup": warmup, "instructions": total,
            "per_exchange": round(total / requests), "seconds": round(took, 1)}


def run_counts(counts: list[Count], *, requests: int, warmup: int, script: Path,
               log: Callable[[str], None], keep: Path | None = None) -> dict[str, Any]:
    """Every count in turn, with progress; a count that fails is an error entry, the rest go on;
    one whose path cannot run here (no HAProxy) is skipped, saying why."""
    from . import run

    results: dict[str, Any] = {"requests": requests, "warmup": warmup, "counts": [], "errors": [], "skipped": []}
    with tempfile.TemporaryDirectory(prefix="pake-instructions-") as tmp:
        for i, count in enumerate(counts, 1):
            why = run.PATH_SPECS[count.path].needs()
            if why:
                results["skipped"].append({**asdict(count), "reason": why})
                log(f"[instructions {i}/{len(counts)}] {count.key}: skipped, {why}")
                continue
            log(f"[instructions {i}/{len(counts)}] {count.profile}: {count.path}, {count.proxy} under callgrind …")
            workdir = Path(tmp) / f"{i}"
            workdir.mkdir()
            try:
                entry = count_one(count, requests=requests, warmup=warmup, script=script, workdir=workdir,
                                  keep=keep)
            except (StartError, RuntimeError, OSError, ValueError) as exc:
                results["errors"].append({**asdict(count), "error": f"{type(exc).__name__}: {exc}"})
                log(f"    failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                continue
            results["counts"].append(entry)
            log(f"    {entry['per_exchange'] / 1000:.1f}k instructions an exchange ({entry['seconds']} s counted)")
    return results


def baseline_counts(path: Path) -> dict[str, int]:
    """key -> instructions an exchange, from a bench results file or this module's own output;
    ValueError naming the file when it is neither."""
    try:
        data = json.loads(path.read_text())
        section = data.get("instructions", data)
        return {Count(c["path"], c["proxy"], c["profile"]).key: int(c["per_exchange"])
                for c in section["counts"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: no instruction counts in it ({type(exc).__name__}: {exc})") from None


def render(results: dict[str, Any], baseline: dict[str, int] | None = None) -> str:
    lines = [f"instructions an exchange (callgrind: {results['requests']} requests on one connection "
             f"after {results['warmup']} uncounted; the proxy's every thread, not the kernel)"]
    counted = {Count(c["path"], c["proxy"], c["profile"]).key: c["per_exchange"] for c in results["counts"]}
    rows = [["profile", "path", "proxy", "instructions", "× HAProxy"]
            + (["vs baseline"] if baseline is not None else [])]
    for c in results["counts"]:
        n = c["per_exchange"]
        row = [c["profile"], c["path"], c["proxy"], f"{n / 1000:.1f}k"]
        reference = REFERENCE.get((c["path"], c["proxy"]))
        haproxy = counted.get(Count(*reference, c["profile"]).key) if reference else None
        row.append(f"{n / haproxy:.2f}×" if haproxy else "")
        if baseline is not None:
            before = baseline.get(Count(c["path"], c["proxy"], c["profile"]).key)
            row.append(f"{before / 1000:.1f}k → {(n - before) / before:+.1%}" if before else "-")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines += [f"failed: {e['profile']}/{e['path']}/{e['proxy']}: {e['error'].splitlines()[0]}"
              for e in results["errors"]]
    lines += [f"skipped: {e['profile']}/{e['path']}/{e['proxy']}: {e['reason']}" for e in results.get("skipped", [])]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser, prefix: str = "") -> None:
    p.add_argument(f"--{prefix}requests", type=int, default=2000, help="counted requests per figure (default 2000)")
    p.add_argument(f"--{prefix}warmup", type=int, default=300, help="uncounted requests first (default 300)")


def main(argv: list[str] | None = None) -> int:
    from . import run

    p = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.add_argument("--count", action="append", metavar="PROFILE/PATH/PROXY",
                   help="what to count, e.g. tiny/sidecar-2-mtls/sidecar-b (repeatable; default: "
                        + ", ".join(c.key for c in COUNTS) + ")")
    p.add_argument("--baseline", type=Path, help="a previous results JSON to compare with")
    p.add_argument("--output", type=Path, help="write the results JSON here")
    p.add_argument("--keep-dumps", type=Path, metavar="DIR",
                   help="keep each count's callgrind dump here (PROFILE-PATH-PROXY.callgrind), to read with "
                        "callgrind_annotate --inclusive=yes --tree=calling")
    p.add_argument("--realistic-script", type=Path, default=run.DEFAULT_SCRIPT)
    args = p.parse_args(argv)
    if args.requests < 1 or args.warmup < 0:
        p.error("--requests must be positive and --warmup not negative")
    counts = list(COUNTS)
    if args.count:
        counts = []
        for text in args.count:
            parts = text.split("/")
            if (len(parts) != 3 or parts[0] not in run.PROFILES or parts[1] not in run.PATH_SPECS
                    or parts[2] not in PROXIES):
                p.error(f"--count {text}: want PROFILE/PATH/PROXY, e.g. tiny/sidecar-2-mtls/sidecar-b "
                        f"(a proxy: {', '.join(PROXIES)})")
            counts.append(Count(parts[1], parts[2], parts[0]))
    if any(c.profile == "realistic" for c in counts) and not args.realistic_script.is_file():
        p.error(f"{args.realistic_script}: the realistic profile's wrk script is missing (--realistic-script)")
    why = available()
    if why:
        print(f"bench.instructions: {why}", file=sys.stderr)
        return 2
    try:
        baseline = baseline_counts(args.baseline) if args.baseline else None
    except ValueError as exc:
        p.error(f"--baseline {exc}")
    results = run_counts(counts, requests=args.requests, warmup=args.warmup, script=args.realistic_script,
                         log=lambda msg: print(msg, flush=True), keep=args.keep_dumps)
    print()
    print(render(results, baseline))
    if args.output:
        args.output.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
