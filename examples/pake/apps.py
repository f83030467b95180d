"""``python -m examples.pake.apps NAME=PORT ... [--outbound NAME=HOST:PORT]``: the demo's apps.

One process serves them all (a 2-core laptop runs the whole mesh): every app is its own
aiohttp ``Application`` on its own socket, behind its own sidecar, and talks to the others
only through that sidecar (``knowledge`` and ``cache`` call out through their sidecar's
outbound listener, ``--outbound``). ``NAME=0`` picks a free port; ``NAME=fd:N`` serves on a
socket the parent bound and passed (so the sidecars could be told the app's port before this
process started). Each app prints ``app NAME listening on http://127.0.0.1:PORT`` once it
accepts. SIGTERM/SIGINT stop them all.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys
from collections.abc import Callable

from aiohttp import web

from examples.echo import make_app as make_echo

__all__ = ["main"]

AppFactory = Callable[[], web.Application]


def _factories(outbound: dict[str, str] | None = None) -> dict[str, AppFactory]:
    from examples.pake.services import make_apps

    return {"echo": make_echo, **make_apps(outbound or {})}


def _bind(port: int | str) -> socket.socket:
    if isinstance(port, str):  # fd:N, bound by the parent
        return socket.socket(fileno=int(port[3:]))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


async def serve(wanted: list[tuple[str, int | str]], outbound: dict[str, str]) -> None:
    factories = _factories(outbound)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runners: list[web.AppRunner] = []
    try:
        for name, port in wanted:
            runner = web.AppRunner(factories[name](), access_log=None, handle_signals=False)
            await runner.setup()
            runners.append(runner)
            sock = _bind(port)
            await web.SockSite(runner, sock).start()
            print(f"app {name} listening on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
        await stop.wait()
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


def _spec(text: str) -> tuple[str, int | str]:
    name, sep, port = text.partition("=")
    names = _factories()
    fd = port.startswith("fd:") and port[3:].isdigit()
    if not sep or name not in names or not (port.isdigit() or fd):
        raise argparse.ArgumentTypeError(f"expected NAME=PORT or NAME=fd:N with NAME one of "
                                         f"{', '.join(names)}, got {text!r}")
    return name, port if fd else int(port)


def _outbound(text: str) -> tuple[str, str]:
    name, sep, address = text.partition("=")
    if not sep or ":" not in address:
        raise argparse.ArgumentTypeError(f"expected NAME=HOST:PORT, got {text!r}")
    return name, address


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.pake.apps", description=__doc__.split("\n")[0])
    parser.add_argument("apps", nargs="+", type=_spec, metavar="NAME=PORT")
    parser.add_argument("--outbound", action="append", type=_outbound, default=[], metavar="NAME=HOST:PORT",
                        help="the sidecar outbound listener app NAME calls other services through")
    args = parser.parse_args(argv)
    import uvloop

    uvloop.run(serve(args.apps, dict(args.outbound)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
