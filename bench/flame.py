"""``python -m bench.flame``: flame graphs of the sidecars of one bench path under wrk load.

Starts the path's processes as ``bench.run`` does (``--path sidecar-1``, ``sidecar-2-mtls``...),
loads it with wrk for ``--seconds`` (``--profile`` tiny or realistic), and runs
``py-spy record --native`` on every sidecar meanwhile: one SVG per sidecar in ``--out``, plus a
text summary of the hottest frames (py-spy's ``--format raw`` folded stacks, self time by frame).
``bench/README.md`` keeps what the graphs showed. Needs py-spy (``pip install py-spy``) and wrk.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from . import run
from .loadgen import run_wrk
from .procs import Processes

__all__ = ["main", "self_time"]


def self_time(folded: Path, top: int = 30) -> list[tuple[float, str]]:
    """The frames where samples were taken (leaf frames), as shares of all samples."""
    leaves: collections.Counter[str] = collections.Counter()
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        leaves[stack.split(";")[-1]] += n
    return [(n / total, frame) for frame, n in leaves.most_common(top)] if total else []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.flame", description=__doc__.split("\n\n")[0])
    p.add_argument("--path", default="sidecar-1", help="a bench path key (default sidecar-1)")
    p.add_argument("--profile", choices=run.PROFILES, default="realistic")
    p.add_argument("--seconds", type=int, default=8)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--out", type=Path, default=Path("bench/flame"))
    args = p.parse_args(argv)
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    spec = run.PATH_SPECS[args.path]
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pake-flame-") as tmp:
        root = Path(tmp)
        (root / "logs").mkdir()
        procs = Processes(root / "logs")
        try:
            _, upstream_port = run.start_upstream(procs, args.profile)
            workdir = root / spec.key
            workdir.mkdir()
            ctx = run.Ctx(procs, workdir, upstream_port, {"root": str(root)})
            started = spec.start(ctx)
            script = run.DEFAULT_SCRIPT if args.profile == "realistic" else None
            run_wrk(started.port, connections=args.connections, duration=1, script=script)  # warm-up
            sidecar_procs = [(i, p) for i, p in enumerate(x for x in started.proxies if x.kind == "sidecar")]
            result: list[object] = []
            load = threading.Thread(target=lambda: result.append(run_wrk(
                started.port, connections=args.connections, duration=2 * args.seconds + 2, script=script)))
            load.start()
            spies = []
            # folded stacks first, then the SVG, one py-spy per sidecar at a time (--native
            # stops the process for each sample: two at once would double the disturbance)
            for fmt, suffix in (("raw", ".txt"), ("flamegraph", ".svg")):
                running = []
                for i, proxy in sidecar_procs:
                    out = (args.out / f"{spec.key}-{args.profile}-{i}").with_suffix(suffix)
                    running.append((out, proxy.role, subprocess.Popen(
                        [pyspy, "record", "--native", "-r", str(args.rate), "-d", str(args.seconds),
                         "-f", fmt, "-o", str(out), "-p", str(proxy.proc.pid)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
                for _, _, spy in running:
                    spy.wait()
                spies += running
            load.join()
            print(f"{spec.label}, {args.profile}: {result[0]}")
            for out, role, spy in spies:
                if out.suffix == ".txt" and out.exists():
                    print(f"\n== {role}: self time by frame ({out}) ==")
                    for share, frame in self_time(out):
                        print(f"{share * 100:5.1f}%  {frame}")
                elif spy.returncode:
                    print(f"py-spy failed for {role}: {spy.stderr.read().decode()[-300:] if spy.stderr else ''}")
        finally:
            procs.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
