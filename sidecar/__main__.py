"""``pake-sidecar run -c sidecar.yaml``: the only place that exits the process.

A bad config stops start-up with one line on stderr naming the file, the path and the
value, and exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import uvloop

from .config.load import load_bootstrap, load_mesh
from .config.log_levels import LOG_FORMATS
from .config.model import Bootstrap
from .config.reader import ConfigError
from .observability.log_writer import LogOutputs
from .observability.logging import configure_logging

__all__ = ["main"]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pake-sidecar", description="The PAKE Mesh sidecar.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the sidecar")
    run.add_argument("-c", "--config", required=True, help="the bootstrap file (sidecar.yaml)")
    run.add_argument("--log-format", choices=LOG_FORMATS, default=None,
                     help="json, console, or auto: console on a terminal (default: log_format of "
                          "sidecar.yaml, else auto); kept over reloads")
    check = sub.add_parser("check", help="validate the config files and exit")
    check.add_argument("-c", "--config", required=True)
    return parser.parse_args(argv)


def _config_error(exc: ConfigError, default_source: object) -> int:
    for problem in exc.problems:
        print(f"pake-sidecar: {exc.source or default_source}: {problem}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        bootstrap = load_bootstrap(args.config)
    except ConfigError as exc:
        return _config_error(exc, args.config)
    if bootstrap.control is not None:
        return _main_joined(args, bootstrap)
    try:
        mesh = load_mesh(bootstrap.mesh_path)
    except ConfigError as exc:
        return _config_error(exc, bootstrap.mesh_path)
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
    configure_logging(logs.channel("events"), bootstrap.log_level, bootstrap.log_format,
                      format_override=args.log_format)
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


def _main_joined(args: argparse.Namespace, bootstrap: Bootstrap) -> int:
    """``control:``: identity, certificate and mesh config come from the control plane (and
    the state directory while it is away)."""
    from certs.pem import PemError

    from .discovery.startup import StartupError, check, start_joined  # cryptography, websockets

    gateway = bootstrap.listener("gateway")
    served = gateway.server_tls if gateway is not None else None
    server_tls = None
    try:
        if served is not None:
            from .tls import ServerTls

            server_tls = ServerTls(served)
        if args.command == "check":
            print(f"ok: {args.config} ({check(bootstrap)})")
            return 0
    except ConfigError as exc:
        return _config_error(exc, bootstrap.mesh_path)
    except (StartupError, PemError) as exc:
        print(f"pake-sidecar: {exc}", file=sys.stderr)
        return 2
    logs = LogOutputs()
    configure_logging(logs.channel("events"), bootstrap.log_level, bootstrap.log_format,
                      format_override=args.log_format)
    from .app import ControlSetup, Sidecar  # after logging is configured

    async def run() -> None:
        loop = asyncio.get_running_loop()
        # Until the sidecar installs its own handlers: SIGTERM during a join ends it cleanly.
        starting = asyncio.current_task()
        assert starting is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, starting.cancel)
        try:
            held = await start_joined(bootstrap)
        except asyncio.CancelledError:
            return
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        sidecar = Sidecar(bootstrap, held.mesh, tls_source=held.source, server_tls=server_tls,
                          logs=logs, origin=held.origin, control=ControlSetup(held.state, held.node))
        await sidecar.run()

    try:
        uvloop.run(run())
    except ConfigError as exc:
        return _config_error(exc, bootstrap.mesh_path)
    except StartupError as exc:
        print(f"pake-sidecar: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"pake-sidecar: cannot start: {exc}", file=sys.stderr)
        return 1
    finally:
        logs.close(2.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
