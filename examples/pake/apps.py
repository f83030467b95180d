"""``python -m examples.pake.apps NAME=PORT ...``: the demo's apps, each on its own port.

One process serves them all (a 2-core laptop runs the whole mesh): every app is its own
aiohttp ``Application`` on its own socket, behind its own sidecar, and talks to the others
only through that sidecar (``knowledge`` and ``cache`` call out through their sidecar's
outbound listener). Port 0 picks a free port; each app prints
``app NAME listening on http://127.0.0.1:PORT`` once it accepts. SIGTERM/SIGINT stop them all.
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


def _factories() -> dict[str, AppFactory]:
    from examples.pake import services

    return {"echo": make_echo, **services.APPS}


def _bind(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


async def serve(wanted: list[tuple[str, int]]) -> None:
    factories = _factories()
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


def _spec(text: str) -> tuple[str, int]:
    name, sep, port = text.partition("=")
    names = _factories()
    if not sep or name not in names or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME=PORT with NAME one of {', '.join(names)}, got {text!r}")
    return name, int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.pake.apps", description=__doc__.split("\n")[0])
    parser.add_argument("apps", nargs="+", type=_spec, metavar="NAME=PORT")
    args = parser.parse_args(argv)
    import uvloop

    uvloop.run(serve(args.apps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
