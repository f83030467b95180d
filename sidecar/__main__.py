"""``pake-sidecar run -c sidecar.yaml [-- APP ARGS...]``, ``check``, ``wait-ready``: the only
place that exits the process.

A bad config stops start-up with one line on stderr naming the file, the path and the
value, and exit status 2. ``run -- APP`` exits with the app's status (sidecar/supervise.py).
``wait-ready`` imports neither the event loop nor the logger: probes run it often.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from typing import TYPE_CHECKING

from .config.log_levels import LOG_FORMATS
from .config.reader import ConfigError, parse_address, parse_duration

if TYPE_CHECKING:
    from .app import Sidecar
    from .config.model import Bootstrap
    from .supervise import AppCommand

__all__ = ["build_parser", "main"]

DEFAULT_ADMIN = "127.0.0.1:15000"


def _duration(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive duration, got {text!r}")
    return seconds


def _address(text: str) -> tuple[str, int]:
    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's, with the terminal's width read here: argparse imports ``shutil`` for it as
    soon as an argument is added, and ``shutil`` imports zlib, bz2 and lzma, 0.55 MB of every
    running sidecar's memory."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position,
                         _terminal_columns() - 2 if width is None else width)


def _terminal_columns() -> int:
    """As ``shutil.get_terminal_size().columns``: a positive $COLUMNS, else the terminal's,
    else 80."""
    try:
        if (columns := int(os.environ["COLUMNS"])) > 0:
            return columns
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns if sys.__stdout__ else 80
    except (AttributeError, ValueError, OSError):
        return 80


def build_parser() -> argparse.ArgumentParser:
    """The command line (the deployment examples' test parses their commands with it)."""
    parser = argparse.ArgumentParser(prog="pake-sidecar", description="The PAKE Mesh sidecar.",
                                     formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the sidecar (and, after --, its app)",
                         formatter_class=_HelpFormatter)
    run.add_argument("-c", "--config", required=True, help="the bootstrap file (sidecar.yaml)")
    run.add_argument("--log-format", choices=LOG_FORMATS, default=None,
                     help="json, console, or auto: console on a terminal (default: log_format of "
                          "sidecar.yaml, else auto); kept over reloads")
    run.add_argument("--ready-timeout", type=_duration, default=60.0, metavar="DURATION",
                     help="with an app: the sidecar must hold a config within this, "
                          "else the app is not started and the exit status is 1 (default 60s)")
    run.add_argument("--grace", type=_duration, default=20.0, metavar="DURATION",
                     help="with an app: how long it may take to exit after SIGTERM before "
                          "SIGKILL; the sidecar drains after it (default 20s)")
    run.add_argument("app", nargs="*", metavar="-- APP ARGS",
                     help="the app to start once the sidecar is ready, and to stop before it drains")
    check = sub.add_parser("check", help="validate the config files and exit",
                           formatter_class=_HelpFormatter)
    check.add_argument("-c", "--config", required=True)
    wait = sub.add_parser("wait-ready", help="exit 0 once the local sidecar is ready (1: timed out)",
                          formatter_class=_HelpFormatter)
    where = wait.add_mutually_exclusive_group()
    where.add_argument("-c", "--config", help="read the admin address from this sidecar.yaml")
    where.add_argument("--admin", type=_address, metavar="HOST:PORT",
                       help=f"the sidecar's admin address (default {DEFAULT_ADMIN})")
    wait.add_argument("--timeout", type=_duration, default=30.0, metavar="DURATION",
                      help="give up after this long (default 30s)")
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.command == "run" and args.app and args.app[0].startswith("-"):
        build_parser().error(f"run: unrecognized arguments: {args.app[0]} (the app goes after --)")
    return args


def _config_error(exc: ConfigError, default_source: object) -> int:
    for problem in exc.problems:
        print(f"pake-sidecar: {exc.source or default_source}: {problem}", file=sys.stderr)
    return 2


def _no_greenlet() -> None:
    """``import structlog`` imports its deprecated ``threadlocal`` module, which imports greenlet
    whenever it is installed (playwright, SQLAlchemy and gevent bring it): 1.1 MB of every
    sidecar's memory, its C++ runtime included, for context kept per greenlet, and a sidecar
    runs none. Marked missing before structlog's first import, the probe finds no greenlet;
    a process that imported structlog already (a test's) is left as it is."""
    if "structlog" not in sys.modules:
        sys.modules.setdefault("greenlet", None)  # type: ignore[arg-type]  # None: "not importable"


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.command == "wait-ready":
        return _wait_ready(args)
    _no_greenlet()
    from .config.load import load_bootstrap, load_mesh

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
    import uvloop

    from .observability.log_writer import LogOutputs
    from .observability.logging import configure_logging

    logs = LogOutputs()  # log lines leave the loop through these queues and writer threads
    configure_logging(logs.channel("events"), bootstrap.log_level, bootstrap.log_format,
                      format_override=getattr(args, "log_format", None))
    from .app import Sidecar  # after logging is configured

    tune_threads(bootstrap)
    outcome = _Outcome(_app_command(args))

    async def run() -> None:
        sidecar = Sidecar(bootstrap, mesh, tls_source=tls_source, server_tls=server_tls, logs=logs)
        await outcome.serve(sidecar)

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
    return outcome.exit()


def tune_threads(bootstrap: Bootstrap) -> None:
    """The process's thread switch interval: with tracing, the export thread encodes span
    batches in Python holding the GIL, and the loop then waits a switch interval for each
    callback (``tracing.EXPORT_SWITCH_INTERVAL`` says why and how much). Only ever lowered."""
    if bootstrap.tracing is not None:
        from .observability.tracing import EXPORT_SWITCH_INTERVAL

        sys.setswitchinterval(min(sys.getswitchinterval(), EXPORT_SWITCH_INTERVAL))


def _main_joined(args: argparse.Namespace, bootstrap: Bootstrap) -> int:
    """``control:``: identity, certificate and mesh config come from the control plane (and
    the state directory while it is away)."""
    import uvloop

    from certs.pem import PemError

    from .observability.log_writer import LogOutputs
    from .observability.logging import configure_logging

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
                      format_override=getattr(args, "log_format", None))
    from .app import ControlSetup, Sidecar  # after logging is configured

    tune_threads(bootstrap)
    outcome = _Outcome(_app_command(args))

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
        await outcome.serve(sidecar)

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
    return outcome.exit()


def _app_command(args: argparse.Namespace) -> AppCommand | None:
    if args.command != "run" or not args.app:
        return None
    from .supervise import AppCommand

    return AppCommand(argv=tuple(args.app), ready_timeout=args.ready_timeout, grace=args.grace)


class _Outcome:
    """How ``run`` ends: the sidecar alone exits 0; with an app, the app's status (or the
    reason it never ran, printed once the loop has stopped)."""

    def __init__(self, command: AppCommand | None) -> None:
        self.command = command
        self.status = 0
        self.problem: str | None = None

    async def serve(self, sidecar: Sidecar) -> None:
        if self.command is None:
            await sidecar.run()
            return
        from .supervise import Supervisor

        supervisor = Supervisor(sidecar, self.command)
        self.status = await supervisor.run()
        self.problem = supervisor.problem

    def exit(self) -> int:
        if self.problem is not None:
            print(f"pake-sidecar: {self.problem}", file=sys.stderr)
        return self.status


def _wait_ready(args: argparse.Namespace) -> int:
    from .wait_ready import wait_ready

    if args.config is not None:
        from .config.load import load_bootstrap

        try:
            admin = load_bootstrap(args.config).listener("admin")
        except ConfigError as exc:
            return _config_error(exc, args.config)
        if admin is None:
            print(f"pake-sidecar: wait-ready: {args.config}: listeners.admin is not set; "
                  "the sidecar has no admin endpoint to ask", file=sys.stderr)
            return 2
        if admin.address[1] == 0:
            print(f"pake-sidecar: wait-ready: {args.config}: listeners.admin port is 0 (picked at "
                  "start): pass --admin HOST:PORT with the port the sidecar logged", file=sys.stderr)
            return 2
        host, port = admin.address
    else:
        host, port = args.admin or parse_address(DEFAULT_ADMIN)
    seen = wait_ready(host, port, args.timeout)
    if not seen.ready:
        print(f"pake-sidecar: wait-ready: the sidecar at {host}:{port} is not ready after "
              f"{args.timeout:g}s: {seen.detail}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
