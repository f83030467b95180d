"""``python -m bench.fanout``: the control plane's push fan-out (issue 9's benchmark).

For each N (default 100 and 1,000) it starts one real ``pakectl serve`` (``--max-streams N``),
applies a mesh of ``--services`` services that all call ``orders``, makes one join token per
(worker process, service) with as many uses as that worker has sidecars of the service, and
starts N simulated sidecars (``bench/fanout_client.py``: real joins, real mTLS WebSocket
streams, ``--per-worker`` of them per process). Then:

- the stream bound: ``--extra`` more sidecars (joined, with valid certificates) try to open a
  stream past ``--max-streams``; each must get a clear refusal (HTTP 503 ``too_many_streams``)
  and the N connected streams must stay connected;
- ``--changes`` route changes, one at a time, through the admin API (what ``pakectl apply``
  calls): a canary route on ``orders`` appears or goes, so every sidecar's snapshot changes;
  the time from sending the apply to each sidecar's ack (p50, p99, max), and the control
  plane's CPU seconds and RSS (``/proc``) around it.

Progress goes to stdout (a line per 100 sidecars joined and connected); the results are a
table and the ``fanout`` key of ``bench/results.json`` (other keys are kept). Every process it
starts is stopped at the end, also on Ctrl-C or error. Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from .procs import CLK_TCK, Proc, Processes, cpu_ticks, json_event, memory_kb

__all__ = ["FanoutSettings", "mesh", "render", "run", "main"]

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO / "bench" / "results.json"
TARGET_N = 1000
TARGET_MS = 1000.0  # issue 9: 1,000 sidecars all acked within 1 s
PROGRESS_EVERY = 100

Log = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class FanoutSettings:
    sizes: tuple[int, ...] = (100, 1000)
    services: int = 10  # callers of `orders`; `orders` itself is one more
    per_worker: int = 250  # simulated sidecars per process
    changes: int = 3
    extra: int = 5  # sidecars that try to connect past the stream bound
    ack_timeout: float = 30.0  # per change
    setup_timeout: float = 300.0
    profile_dir: Path | None = None  # py-spy collapsed stacks of the control plane during the changes


def mesh(services: int, canary: bool) -> dict[str, Any]:
    """Every ``svc-NN`` calls ``orders`` under ``/orders/``; ``canary`` adds a header route on
    ``orders``, which every sidecar's snapshot carries (all of them call ``orders``)."""
    orders_routes: list[dict[str, Any]] = [{"to": [{"service": "orders"}]}]
    if canary:
        orders_routes.insert(0, {"match": {"path_prefix": "/v2/", "headers": {"x-canary": "1"}},
                                 "to": [{"service": "orders", "weight": 100}]})
    out: dict[str, Any] = {"orders": {"routes": orders_routes}}
    for i in range(services):
        name = f"svc-{i:02d}"
        out[name] = {"routes": [{"match": {"path_prefix": "/orders/"}, "to": [{"service": "orders"}]},
                                {"to": [{"service": name}]}]}
    return {"services": out}


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: the smallest value with at least ``q`` of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _mb(kb: int) -> float:
    return round(kb / 1024, 1)


class WorkerProc:
    """One process of simulated sidecars; its stdout events go to ``on_event`` or the queue."""

    def __init__(self, index: int, proc: asyncio.subprocess.Process,
                 on_progress: Callable[[int, str, int], None]) -> None:
        self.index = index
        self.proc = proc
        self._on_progress = on_progress
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=64)
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") in ("joined", "connected"):
                self._on_progress(self.index, event["event"], int(event["n"]))
            else:
                await self.events.put(event)
        await self.events.put({"event": "exited", "code": await self.proc.wait()})

    async def expect(self, name: str, timeout: float) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            event = await self.events.get()
        if event.get("event") != name:
            raise RuntimeError(f"simulated sidecars {self.index}: expected {name}, got {event}")
        return event

    async def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        await self.proc.stdin.drain()

    def cpu_seconds(self) -> float:
        try:
            return cpu_ticks(self.proc.pid) / CLK_TCK
        except OSError:
            return 0.0


@dataclass
class Progress:
    """A line per PROGRESS_EVERY sidecars joined / connected (and one at the end), summed over
    the processes; ``totals`` says how many of each to expect."""

    totals: dict[str, int]
    log: Log
    started: float = field(default_factory=time.monotonic)
    counts: dict[tuple[int, str], int] = field(default_factory=dict)
    shown: dict[str, int] = field(default_factory=dict)

    def __call__(self, worker: int, what: str, n: int) -> None:
        self.counts[(worker, what)] = n
        done = sum(v for (_, w), v in self.counts.items() if w == what)
        total = self.totals.get(what, 0)
        mark = total if done >= total else done // PROGRESS_EVERY * PROGRESS_EVERY
        if mark > self.shown.get(what, 0):
            self.shown[what] = mark
            self.log(f"  {what} {done}/{total} ({time.monotonic() - self.started:.1f} s)")


async def _admin(http: aiohttp.ClientSession, admin: str, method: str, path: str,
                 body: Any = None) -> Any:
    async with http.request(method, f"http://{admin}{path}", json=body) as r:
        data = await r.json(content_type=None)
        if r.status != 200:
            raise RuntimeError(f"{method} {path}: {r.status} {data}")
        return data


def _start_control(procs: Processes, state: Path, max_streams: int) -> tuple[Proc, dict[str, int]]:
    proc = procs.start("control", [sys.executable, "-m", "control", "serve", "--state-dir", str(state),
                                   "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
                                   "--max-streams", str(max_streams)],
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    serving = proc.wait_for_stdout(json_event("serving"), timeout=30)
    assert isinstance(serving, dict)
    return proc, dict(serving["ports"])


def _assign(n: int, extra: int, settings: FanoutSettings) -> list[list[dict[str, Any]]]:
    """Sidecars round-robin over the services, in blocks of ``per_worker`` per process; the
    extra ones (the stream-bound probe) go to the first process."""
    names = ["orders"] + [f"svc-{i:02d}" for i in range(settings.services)]
    workers = max(1, math.ceil(n / settings.per_worker))
    out: list[list[dict[str, Any]]] = [[] for _ in range(workers)]
    for i in range(n + extra):
        w = 0 if i >= n else i * workers // n
        out[w].append({"service": names[i % len(names)], "node": f"n{i:05d}",
                       "address": f"127.0.0.{1 + i // 50000}:{10000 + i % 50000}",
                       "extra": i >= n})
    return out


async def run_size(n: int, settings: FanoutSettings, root: Path, log: Log) -> dict[str, Any]:
    procs = Processes(root)
    workers: list[WorkerProc] = []
    result: dict[str, Any] = {"sidecars": n, "services": settings.services + 1}
    try:
        control, ports = await asyncio.to_thread(_start_control, procs, root / "state", n)
        admin, listen = f"127.0.0.1:{ports['admin']}", f"127.0.0.1:{ports['listen']}"
        pid = control.pid
        idle = memory_kb(pid)
        async with aiohttp.ClientSession() as http:
            await _admin(http, admin, "POST", "/v1/config", {"mesh": mesh(settings.services, False),
                                                               "by": "bench"})
            plan = _assign(n, settings.extra, settings)
            for w, sims in enumerate(plan):
                uses: dict[str, int] = {}
                for sim in sims:
                    uses[sim["service"]] = uses.get(sim["service"], 0) + 1
                tokens = {}
                for service, count in uses.items():
                    made = await _admin(http, admin, "POST", "/v1/tokens",
                                        {"service": service, "uses": count, "ttl": 3600, "by": "bench"})
                    tokens[service] = made["token"]
                for sim in sims:
                    sim["token"] = tokens[sim["service"]]
                (root / f"worker-{w}.json").write_text(json.dumps(sims))
            result["workers"] = len(plan)
            log(f"fan-out N={n}: {len(plan)} process(es) of simulated sidecars, "
                f"{settings.services + 1} services, control plane pid {pid}")
            progress = Progress({"joined": n + settings.extra, "connected": n}, log)
            cpu_setup0, t_setup0 = cpu_ticks(pid), time.monotonic()
            for w in range(len(plan)):
                stderr = open(root / f"worker-{w}.err", "wb")
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "bench.fanout_client", "--listen", listen,
                    "--spec", str(root / f"worker-{w}.json"), "--workdir", str(root / f"worker-{w}"),
                    cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True,
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=stderr,
                    limit=1 << 22)
                stderr.close()
                workers.append(WorkerProc(w, proc, progress))
            joined = await asyncio.gather(*(wp.expect("all_joined", settings.setup_timeout)
                                            for wp in workers))
            t_joined = time.monotonic()
            ready = await asyncio.gather(*(wp.expect("ready", settings.setup_timeout) for wp in workers))
            t_ready = time.monotonic()
            refused_early = [r for e in ready for r in e["refused"]]
            if refused_early or not all(e["ok"] for e in ready):
                raise RuntimeError(f"set-up: streams refused or not ready: {refused_early[:3]} "
                                   f"{[e['closed'] for e in ready]}")
            before = memory_kb(pid)
            result["setup"] = {
                "join_s": round(t_joined - t_setup0, 2),
                "join_s_per_worker": [round(j["seconds"], 2) for j in joined],
                "connect_s": round(t_ready - t_joined, 2),
                "control_plane_cpu_s": round((cpu_ticks(pid) - cpu_setup0) / CLK_TCK, 2),
            }
            log(f"  set-up: joined in {t_joined - t_setup0:.1f} s, streams up and acked in "
                f"{t_ready - t_joined:.1f} s")

            result["stream_bound"] = await _probe_bound(http, admin, workers[0], n, settings)
            bound = result["stream_bound"]
            log(f"  stream bound {n}: {bound['refused']}/{bound['attempted']} extra streams refused "
                f"({bound['status']} {bound['error']}), {bound['connected_after']} still connected")

            settled = await _settle(http, admin, n, settings.setup_timeout)
            log(f"  settled: every stream acked its latest snapshot ({settled:.1f} s)")
            profiler = _start_profiler(procs, root, pid, settings)
            if profiler is not None:
                await asyncio.sleep(1.0)  # py-spy attaches
            changes = []
            for i in range(settings.changes):
                changes.append(await _change(http, admin, workers, pid, settings, canary=i % 2 == 0,
                                             version=2 + i))
                c = changes[-1]
                log(f"  change {i + 1}/{settings.changes}: {c['acked']}/{n} acked, p50 {c['p50_ms']} ms, "
                    f"p99 {c['p99_ms']} ms, max {c['max_ms']} ms; control plane CPU {c['control_plane_cpu_s']} s")
            after = memory_kb(pid)
            if profiler is not None and settings.profile_dir is not None:
                os.killpg(profiler.pid, signal.SIGINT)  # py-spy writes its output on SIGINT
                await asyncio.to_thread(profiler.popen.wait, 30)
                procs.stop(profiler)
                result["profile"] = str(settings.profile_dir / f"control-{root.name}.txt")
                log(f"  profile of the control plane during the changes: {result['profile']}")
            result["changes"] = changes
            result["control_plane"] = {
                "rss_idle_mb": _mb(idle["VmRSS"]), "rss_before_mb": _mb(before["VmRSS"]),
                "rss_after_mb": _mb(after["VmRSS"]), "peak_rss_mb": _mb(after["VmHWM"]),
                "cpu_s_total": round(cpu_ticks(pid) / CLK_TCK, 2),
            }
            for wp in workers:
                await wp.send(cmd="stop")
    finally:
        for wp in workers:
            if wp.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(wp.proc.pid, signal.SIGTERM)
        for wp in workers:
            with contextlib.suppress(TimeoutError, ProcessLookupError):
                async with asyncio.timeout(10):
                    await wp.proc.wait()
            if wp.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(wp.proc.pid, signal.SIGKILL)
            wp.reader.cancel()
        await asyncio.to_thread(procs.stop_all)
    return result


async def _settle(http: aiohttp.ClientSession, admin: str, n: int, timeout: float) -> float:
    """Wait until the set-up's endpoint pushes are over: the control plane reports every one of
    the ``n`` streams acked at its latest version, twice in a row, 0.5 s apart (more than its
    longest debounce), so no change is measured on top of the set-up's."""
    started = time.monotonic()
    calm = 0
    async with asyncio.timeout(timeout):
        while calm < 2:
            await asyncio.sleep(0.5)
            status = await _admin(http, admin, "GET", "/v1/status")
            states = [s["state"] for s in status["sidecars"] if s.get("connected")]
            calm = calm + 1 if len(states) == n and all(s == "acked" for s in states) else 0
    return time.monotonic() - started


def _start_profiler(procs: Processes, root: Path, pid: int, settings: FanoutSettings) -> Proc | None:
    """py-spy on the control plane (``--profile DIR``), until the changes are measured."""
    if settings.profile_dir is None:
        return None
    settings.profile_dir.mkdir(parents=True, exist_ok=True)
    out = settings.profile_dir / f"control-{root.name}.txt"
    proc = procs.start("py-spy", [str(Path(sys.executable).parent / "py-spy"), "record", "--pid",
                                  str(pid), "--rate", "250", "--format", "raw", "--output", str(out),
                                  "--nonblocking"])
    return proc


async def _probe_bound(http: aiohttp.ClientSession, admin: str, worker: WorkerProc, n: int,
                       settings: FanoutSettings) -> dict[str, Any]:
    """Extra sidecars with valid certificates open streams past ``--max-streams N``."""
    await worker.send(cmd="extra")
    event = await worker.expect("extra", settings.setup_timeout)
    outcomes = event["outcomes"]
    refused = [o for o in outcomes if o["status"] != 101]
    bodies = [json.loads(o["body"]) for o in refused if o["body"].startswith("{")]
    status = await _admin(http, admin, "GET", "/v1/status")
    return {
        "max_streams": n, "attempted": len(outcomes), "refused": len(refused),
        "status": refused[0]["status"] if refused else None,
        "error": bodies[0]["error"] if bodies else None,
        "detail": bodies[0]["detail"] if bodies else None,
        "refusal_ms_max": round(max((o["ms"] for o in refused), default=0.0), 1),
        "connected_after": sum(1 for s in status["sidecars"] if s.get("connected")),
    }


async def _change(http: aiohttp.ClientSession, admin: str, workers: list[WorkerProc], pid: int,
                  settings: FanoutSettings, *, canary: bool, version: int) -> dict[str, Any]:
    for wp in workers:
        await wp.send(cmd="arm", version=version, timeout=settings.ack_timeout)
    await asyncio.gather(*(wp.expect("armed", 30) for wp in workers))
    body = {"mesh": mesh(settings.services, canary), "by": "bench"}
    cpu0, wcpu0, mem0 = cpu_ticks(pid), sum(w.cpu_seconds() for w in workers), memory_kb(pid)
    t0 = time.monotonic()
    applied = await _admin(http, admin, "POST", "/v1/config", body)
    t_applied = time.monotonic()
    if applied["version"] != version:
        raise RuntimeError(f"applied version {applied['version']}, expected {version}")
    acked = await asyncio.gather(*(wp.expect("acked", settings.ack_timeout + 30) for wp in workers))
    cpu1, wcpu1, mem1 = cpu_ticks(pid), sum(w.cpu_seconds() for w in workers), memory_kb(pid)
    latencies = [(t - t0) * 1000 for e in acked for t in e["times"]]
    missing = [m for e in acked for m in e["missing"]]
    out: dict[str, Any] = {
        "version": version, "acked": len(latencies), "missing": len(missing),
        "closed": [c for e in acked for c in e["closed"]][:5],
        "apply_ms": round((t_applied - t0) * 1000, 1),
        "snapshot_bytes": max(e["snapshot_bytes"] for e in acked),
        "control_plane_cpu_s": round((cpu1 - cpu0) / CLK_TCK, 2),
        "sidecar_processes_cpu_s": round(wcpu1 - wcpu0, 2),
        "rss_before_mb": _mb(mem0["VmRSS"]), "rss_after_mb": _mb(mem1["VmRSS"]),
    }
    for key, q in (("p50_ms", 0.5), ("p99_ms", 0.99), ("max_ms", 1.0)):
        out[key] = round(percentile(latencies, q), 1) if latencies else None
    return out


def run(settings: FanoutSettings, log: Log) -> dict[str, Any]:
    """Every size in turn, each with its own control plane; returns the ``fanout`` results."""
    runs = []
    with tempfile.TemporaryDirectory(prefix="pake-fanout-") as tmp:
        for n in settings.sizes:
            root = Path(tmp) / f"n{n}"
            root.mkdir()
            runs.append(asyncio.run(run_size(n, settings, root, log)))
    return {"settings": {"sizes": list(settings.sizes), "services": settings.services + 1,
                         "per_worker": settings.per_worker, "changes": settings.changes,
                         "extra": settings.extra},
            "runs": runs, "targets": targets(runs)}


def targets(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in runs:
        if r["sidecars"] >= TARGET_N:
            worst = max((c["max_ms"] or math.inf) if c["missing"] == 0 else math.inf
                        for c in r["changes"])
            out.append({"target": f"{r['sidecars']} sidecars all acked within {TARGET_MS:.0f} ms",
                        "measured_ms": None if worst == math.inf else worst,
                        "pass": worst <= TARGET_MS})
    return out


def render(results: dict[str, Any]) -> str:
    head = (f"{'N':>6} {'change':>6} {'acked':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
            f"{'apply ms':>8} {'snap KiB':>8} {'cp CPU s':>8} {'sims CPU s':>10} {'cp RSS MB':>16}")
    lines = ["push fan-out (apply -> every sidecar's ack)", head, "-" * len(head)]
    for r in results["runs"]:
        cp = r["control_plane"]
        for i, c in enumerate(r["changes"], 1):
            lines.append(f"{r['sidecars']:>6} {i:>6} {c['acked']:>3}/{r['sidecars']:<3} "
                         f"{c['p50_ms']:>8} {c['p99_ms']:>8} {c['max_ms']:>8} {c['apply_ms']:>8} "
                         f"{c['snapshot_bytes'] / 1024:>8.1f} {c['control_plane_cpu_s']:>8} "
                         f"{c['sidecar_processes_cpu_s']:>10} "
                         f"{c['rss_before_mb']:>7} -> {c['rss_after_mb']:<5}")
        s, b = r["setup"], r["stream_bound"]
        lines.append(f"{'':>6} set-up: join {s['join_s']} s, streams {s['connect_s']} s, control plane "
                     f"CPU {s['control_plane_cpu_s']} s; RSS idle {cp['rss_idle_mb']} MB, "
                     f"{r['sidecars']} streams {cp['rss_before_mb']} MB, peak {cp['peak_rss_mb']} MB")
        lines.append(f"{'':>6} stream bound {b['max_streams']}: {b['refused']}/{b['attempted']} extra "
                     f"refused ({b['status']} {b['error']}, within {b['refusal_ms_max']} ms), "
                     f"{b['connected_after']} still connected")
    for t in results["targets"]:
        lines.append(f"target: {t['target']}: {'PASS' if t['pass'] else 'MISS'} "
                     f"(worst max {t['measured_ms']} ms)")
    return "\n".join(lines)


def write_results(output: Path, fanout: dict[str, Any]) -> None:
    """Set the ``fanout`` key of the results file, keeping what the other benchmarks wrote."""
    data: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads(output.read_text())
        if isinstance(loaded, dict):
            data = loaded
    data["fanout"] = fanout
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(data, indent=2, default=str) + "\n")


def add_arguments(p: argparse.ArgumentParser, prefix: str = "") -> None:
    d = FanoutSettings()
    add = p.add_argument
    add(f"--{prefix}sizes", default=",".join(map(str, d.sizes)),
        help=f"comma-separated numbers of simulated sidecars (default {','.join(map(str, d.sizes))})")
    add(f"--{prefix}services", type=int, default=d.services,
        help=f"services calling orders (default {d.services})")
    add(f"--{prefix}per-worker", type=int, default=d.per_worker,
        help=f"simulated sidecars per process (default {d.per_worker})")
    add(f"--{prefix}changes", type=int, default=d.changes,
        help=f"route changes measured per size (default {d.changes})")
    add(f"--{prefix}extra", type=int, default=d.extra,
        help=f"streams tried past --max-streams (default {d.extra})")


def settings_from(args: argparse.Namespace, prefix: str = "") -> FanoutSettings:
    get = lambda name: getattr(args, prefix.replace("-", "_") + name)  # noqa: E731
    try:
        sizes = tuple(int(s) for s in get("sizes").split(",") if s.strip())
    except ValueError:
        raise SystemExit(f"bench: --{prefix}sizes: numbers separated by commas, got {get('sizes')!r}") from None
    values = (*sizes, get("services"), get("per_worker"), get("changes"))
    if not sizes or min(values) < 1 or get("extra") < 1:
        raise SystemExit(f"bench: --{prefix}sizes, services, per-worker, changes and extra must be positive")
    return FanoutSettings(sizes=sizes, services=get("services"), per_worker=get("per_worker"),
                          changes=get("changes"), extra=get("extra"))


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fanout", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.add_argument("--profile", type=Path, default=None, metavar="DIR",
                   help="record py-spy profiles (collapsed stacks, flamegraph.pl's input) of the control plane during the changes into DIR")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                   help="results JSON; its fanout key is set (default bench/results.json)")
    args = p.parse_args(argv)
    settings = settings_from(args)
    if args.profile is not None:
        settings = dataclasses.replace(settings, profile_dir=args.profile.resolve())
    old = {s: signal.signal(s, _interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        results = run(settings, lambda msg: print(msg, flush=True))
    except KeyboardInterrupt:
        print("\nbench: interrupted; every process it started has been stopped", file=sys.stderr)
        return 130
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    print()
    print(render(results))
    write_results(args.output, results)
    print(f"\nwrote {args.output}")
    return 0 if all(c["missing"] == 0 for r in results["runs"] for c in r["changes"]) else 1


if __name__ == "__main__":
    sys.exit(main())
