"""Per-request Python cost of the sidecar's hot path, without sockets or the kernel.

A real ``DownstreamConnection`` -> pipeline -> router -> ``UpstreamConnection`` run over
in-memory transports: the upstream transport answers every request at once with the
profile's response. Prints µs per exchange; ``--profile`` runs cProfile over it.
``python -m bench.hotpath [--profile] [--requests N]``
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import statistics
import time
from pathlib import Path

import uvloop

from bench.loadgen import build_request, lua_headers
from bench.upstream import response_for
from sidecar.config.model import Bootstrap, ListenerConfig, MeshConfig
from sidecar.config.load import parse_mesh
from sidecar.listener.connection import DownstreamConnection, ListenerContext, ServerState
from sidecar.observability.metrics import Metrics
from sidecar.pipeline import Pipeline
from sidecar.snapshot_slot import SnapshotSlot
from sidecar.snapshot import build_snapshot
from sidecar.upstream.cluster_manager import ClusterManager
from sidecar.upstream.upstream_connection import UpstreamConnection

__all__ = ["main"]

from bench.run import DEFAULT_SCRIPT as LUA  # noqa: E402 - the realistic profile's wrk script


class _Transport:
    """Enough of an asyncio transport for the protocols; ``on_write`` sees every write."""

    def __init__(self, on_write=None) -> None:  # type: ignore[no-untyped-def]
        self.on_write = on_write
        self.written = 0
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written += len(data)
        if self.on_write is not None:
            self.on_write(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    abort = close

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def set_write_buffer_limits(self, high: int) -> None: ...

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else default


def request_bytes(profile: str, script: Path = LUA) -> bytes:
    """The request wrk sends for ``profile`` (the realistic one's headers from its script)."""
    return build_request(15106, lua_headers(script) if profile == "realistic" else [])


class _EncodingExporter:
    """The OTLP exporter's work without its socket: every batch encoded to protobuf bytes,
    on the processor's thread, so the measured CPU time includes the export thread's share."""

    def __init__(self) -> None:
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

        self.encode = encode_spans

    def export(self, spans):  # type: ignore[no-untyped-def]
        from opentelemetry.sdk.trace.export import SpanExportResult

        self.encode(spans).SerializePartialToString()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None: ...

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


async def run(profile: str, requests: int, do_profile: bool, trace: float | None = None,
              script: Path = LUA) -> float:
    loop = asyncio.get_running_loop()
    tracer = None
    if trace is not None:
        from sidecar.config.tracing import TracingConfig
        from sidecar.observability.tracing import Tracer

        exporter = _EncodingExporter()
        tracer = Tracer(TracingConfig(sample=trace, queue=100_000, batch=512), "up",
                        exporter=exporter)  # type: ignore[arg-type]
    mesh: MeshConfig = parse_mesh({"services": {"up": {"endpoints": ["127.0.0.1:1"]}}})
    bootstrap = Bootstrap(source=Path("."), service="up", mode="sidecar", app=("127.0.0.1", 1),
                          listeners=(ListenerConfig("inbound", ("127.0.0.1", 0)),), mesh_path=Path("."))
    clusters = ClusterManager(loop)
    cluster_set = clusters.build(mesh, "up", bootstrap.app)
    clusters.activate(cluster_set)
    snapshot = build_snapshot(bootstrap, mesh, clusters=cluster_set)
    pipeline = Pipeline(service="up", metrics=Metrics(), access_log=None, loop=loop, tracer=tracer)

    snapshots = SnapshotSlot()  # as the sidecar's: the exchange holds its clusters
    snapshots.set(snapshot)
    ctx = ListenerContext(name="inbound", service="up", limits=bootstrap.limits,
                          timeouts=bootstrap.timeouts, state=ServerState(), start=pipeline.start,
                          abort=pipeline.abort, refuse=pipeline.refuse, snapshots=snapshots, pipeline=pipeline,
                          on_protocol_error=lambda c, e: None)
    first, rest = response_for(profile)
    response = first + b"x-request-id: 7f3c9a2e\r\n" + rest if first else rest
    pool = next(iter(cluster_set.get("local-app").pools.values()))  # type: ignore[union-attr]
    upstream = UpstreamConnection(pool, loop)
    upstream.connection_made(_Transport(lambda data: upstream.data_received(response)))  # type: ignore[arg-type]
    pool.connections = 1
    pool.idle.append(upstream)
    down = DownstreamConnection(ctx, loop)
    out = _Transport()
    down.connection_made(out)  # type: ignore[arg-type]
    request = request_bytes(profile, script)
    for _ in range(1000):
        down.data_received(request)
    profiler = cProfile.Profile() if do_profile else None
    if profiler:
        profiler.enable()
    start = time.process_time()  # CPU time: other processes on a shared machine do not count
    for _ in range(requests):
        down.data_received(request)
    if tracer is not None:
        await tracer.close(timeout=60)  # the export thread's encoding is part of the cost
    elapsed = time.process_time() - start
    if profiler:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    assert out.written > 0 and upstream.requests == requests + 1000, "the exchange did not complete"
    return elapsed / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.hotpath")
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the loop")
    parser.add_argument("--trace", type=float, action="append", metavar="SHARE",
                        help="also measure the tiny profile with tracing at this sampled share "
                             "(0.01 = 1%%), interleaved with tracing off; repeatable")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the tracing runs")
    parser.add_argument("--profiles", default="tiny,realistic", help="traffic profiles, comma-separated")
    parser.add_argument("--realistic-script", type=Path, default=LUA,
                        help=f"wrk script of the realistic profile (default {LUA})")
    args = parser.parse_args()
    from sidecar import compiled, pipeline

    print(f"the hot path runs as {compiled.loaded_form(pipeline)} (PAKE_PURE_PYTHON=1: Python; "
          "`make compile`: compiled)")
    for profile in (p.strip() for p in args.profiles.split(",") if p.strip()):
        if profile == "realistic" and not args.realistic_script.is_file():
            # a checkout without ../shared (CI's): the tiny profile still measures the path
            print(f"{profile:10s} skipped: {args.realistic_script} is missing (--realistic-script)")
            continue
        us = uvloop.run(run(profile, args.requests, args.profile, script=args.realistic_script))
        print(f"{profile:10s} {us:6.2f} µs of Python per exchange (CPU time, no I/O)")
    if args.trace:
        # Tracing's cost is a few µs beside a wall of noise: off and each share are run in
        # turn, several rounds, and compared by their medians. Tiny only: the realistic
        # profile carries a sampled traceparent, which parent-based sampling follows.
        shares: list[float | None] = [None, *args.trace]
        runs: dict[float | None, list[float]] = {share: [] for share in shares}
        for _ in range(args.rounds):
            for share in shares:
                runs[share].append(uvloop.run(run("tiny", args.requests // 2, False, share)))
        off = statistics.median(runs[None])
        print(f"tracing (tiny, median of {args.rounds} interleaved rounds): off {off:.2f} µs")
        for share in args.trace:
            traced = statistics.median(runs[share])
            print(f"  sampled {share:.0%}: {traced:6.2f} µs per exchange, "
                  f"+{traced - off:.2f} µs ({(traced - off) / off:+.1%})")


if __name__ == "__main__":
    main()
