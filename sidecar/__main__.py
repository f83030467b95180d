"""``pake-sidecar run -c sidecar.yaml``: the only place that exits the process.

A bad config stops start-up with one line on stderr naming the file, the path and the
value, and exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import uvloop

from .config.load import load_bootstrap, load_mesh
from .config.reader import ConfigError
from .observability.log_writer import LogOutputs
from .observability.logging import configure_logging

__all__ = ["main"]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pake-sidecar", description="The PAKE Mesh sidecar.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the sidecar")
    run.add_argument("-c", "--config", required=True, help="the bootstrap file (sidecar.yaml)")
    check = sub.add_parser("check", help="validate the config files and exit")
    check.add_argument("-c", "--config", required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        bootstrap = load_bootstrap(args.config)
        mesh = load_mesh(bootstrap.mesh_path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"pake-sidecar: {exc.source}: {problem}", file=sys.stderr)
        return 2
    tls_source = server_tls = None
    gateway = bootstrap.listener("gateway")
    served = gateway.server_tls if gateway is not None else None  # the gateway's own certificate
    if bootstrap.tls is not None or served is not None:
        # Before the loop and the logger: a bad PEM file is one line naming it, like a bad config.
        from certs.pem import PemError

        from .tls import ServerTls, load_source  # pulls in cryptography: only when TLS is configured
        try:
            if bootstrap.tls is not None:
                tls_source = load_source(bootstrap, mesh)
            if served is not None:
                server_tls = ServerTls(served)
        except PemError as exc:
            print(f"pake-sidecar: {exc}", file=sys.stderr)  # "<file>: <problem>"
            return 2
    if args.command == "check":
        print(f"ok: {args.config} (mesh {bootstrap.mesh_path}, version {mesh.version},"
              f" {len(mesh.services)} services)")
        return 0
    logs = LogOutputs()  # log lines leave the loop through these queues and writer threads
    configure_logging(logs.channel("events"), bootstrap.log_level)
    from .app import Sidecar  # after logging is configured

    async def run() -> None:
        sidecar = Sidecar(bootstrap, mesh, tls_source=tls_source, server_tls=server_tls, logs=logs)
        await sidecar.run()

    try:
        uvloop.run(run())
    except ConfigError as exc:  # found while compiling the first snapshot (key files, schemas)
        for problem in exc.problems:
            print(f"pake-sidecar: {exc.source or bootstrap.mesh_path}: {problem}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"pake-sidecar: cannot start: {exc}", file=sys.stderr)
        return 1
    finally:
        logs.close(2.0)  # the loop has stopped: write what is queued (bounded), "stopped" included
    return 0


if __name__ == "__main__":
    sys.exit(main())
