"""``pake-sidecar run -c sidecar.yaml -- APP ARGS...``: the sidecar starts and stops its app.

The order is the point (the two oldest complaints about mesh sidecars): the app starts only
once the sidecar listens and holds a config and a certificate, so its first outbound call
does not fail; and on SIGTERM the app stops first (it may still call out, and its callers
still reach it) while the sidecar keeps serving, and the sidecar drains last. An app that
exits on its own (a batch job) makes the sidecar drain and the process exit with the app's
status, so a Job completes instead of waiting forever on its sidecar.

The app runs in a session and process group of its own (``setsid``, as dumb-init does):
Ctrl-C at a terminal reaches only the sidecar, which forwards it once, and a signal reaches
a shell wrapper's children too. Forwarded: SIGTERM and SIGINT (which also stop the pair),
SIGHUP (the sidecar reloads as well), SIGUSR1, SIGUSR2, SIGWINCH. The app gets ``grace``
seconds after the stop signal, then SIGKILL. Exit status: the app's, 128+N when a signal N
ended it (the shell's convention); 127/126 when it cannot be started. The app's environment
gets ``PAKE_SIDECAR_ADMIN`` and ``PAKE_SIDECAR_OUTBOUND`` (``host:port``, as bound).
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from .app import Sidecar

__all__ = ["AppCommand", "Supervisor", "exit_status"]

log = structlog.get_logger("pake.supervise")

_STOP = (signal.SIGTERM, signal.SIGINT)
_FORWARD = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH)


@dataclass(frozen=True, slots=True)
class AppCommand:
    argv: tuple[str, ...]
    ready_timeout: float  # the sidecar must hold a config within this, or the app never starts
    grace: float  # after the stop signal, before SIGKILL


def exit_status(returncode: int) -> int:
    """asyncio's returncode (negative: killed by that signal) -> a shell's exit status."""
    return 128 - returncode if returncode < 0 else returncode


class Supervisor:
    """Runs ``sidecar`` (start, drain) around one app process. ``problem`` is the line
    ``__main__`` prints on stderr when the app could not run."""

    def __init__(self, sidecar: Sidecar, command: AppCommand) -> None:
        self.sidecar = sidecar
        self.command = command
        self.problem: str | None = None
        self._stop = asyncio.Event()
        self._stop_signal = signal.SIGTERM
        self._proc: asyncio.subprocess.Process | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        # Handlers first: a signal sent as soon as the sidecar is up must not kill it.
        for sig in _STOP:
            loop.add_signal_handler(sig, self._on_stop, sig)
        for sig in _FORWARD:
            loop.add_signal_handler(sig, self._on_forward, sig)
        try:
            await self.sidecar.start()
            try:
                if not await self._until_ready():
                    return 0 if self._stopping() else 1
                failed = await self._spawn()
                if failed is not None:
                    return failed
                return await self._watch()
            finally:
                await self._kill_app()  # only if something above failed with the app running
                await self.sidecar.drain()
        finally:
            for sig in (*_STOP, *_FORWARD):
                loop.remove_signal_handler(sig)

    # === the steps ======================================================================
    async def _until_ready(self) -> bool:
        """The sidecar holds a config (static: at once; joined: once the control plane or
        the state directory gave one). False: timed out, or a stop came first."""
        waits = {asyncio.create_task(self.sidecar.configured.wait()),
                 asyncio.create_task(self._stop.wait()),
                 asyncio.create_task(self.sidecar.stopping.wait())}
        try:
            await asyncio.wait(waits, timeout=self.command.ready_timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
        if self._stopping():
            log.info("app_not_started", reason="stopped before the sidecar was ready")
            return False
        if not self.sidecar.configured.is_set():
            self.problem = (f"the sidecar holds no config after {self.command.ready_timeout:g}s "
                            f"(control plane unreachable?): {self.command.argv[0]} not started")
            log.error("app_not_started", reason=self.problem)
            return False
        return True

    async def _spawn(self) -> int | None:
        """Start the app; None, or the exit status when it cannot be started."""
        argv = self.command.argv
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *argv, start_new_session=True, env={**os.environ, **self._env()})
        except OSError as exc:
            self.problem = f"cannot start the app {argv[0]!r}: {exc.strerror or exc}"
            log.error("app_not_started", reason=self.problem)
            return 127 if exc.errno == errno.ENOENT else 126  # the shell's "not found", "cannot run"
        log.info("app_started", pid=self._proc.pid, command=argv[0])
        return None

    def _env(self) -> dict[str, str]:
        """Where the app finds its sidecar, ports picked at start (``0``) included:
        ``PAKE_SIDECAR_ADMIN`` and ``PAKE_SIDECAR_OUTBOUND`` (``host:port``), when configured."""
        env = {}
        ports = self.sidecar.ports()
        for name in ("admin", "outbound"):
            listener = self.sidecar.bootstrap.listener(name)
            if listener is not None and name in ports:
                host = listener.address[0]
                host = f"[{host}]" if ":" in host else host
                env[f"PAKE_SIDECAR_{name.upper()}"] = f"{host}:{ports[name]}"
        return env

    async def _watch(self) -> int:
        """Until the app exits, by itself or stopped by a signal or ``POST /shutdown``."""
        proc = self._proc
        assert proc is not None
        exited = asyncio.create_task(proc.wait())
        stop = asyncio.create_task(self._stop.wait())
        shutdown = asyncio.create_task(self.sidecar.stopping.wait())
        try:
            await asyncio.wait({exited, stop, shutdown}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            shutdown.cancel()
        if not exited.done():
            reason = "shutdown" if shutdown.done() and not stop.done() else self._stop_signal.name
            log.info("app_stopping", pid=proc.pid, reason=reason, grace_s=self.command.grace)
            self._signal(self._stop_signal)
            try:
                async with asyncio.timeout(self.command.grace):
                    await asyncio.shield(exited)
            except TimeoutError:
                log.warning("app_grace_expired", pid=proc.pid, grace_s=self.command.grace)
                self._signal(signal.SIGKILL)
        returncode = await exited
        status = exit_status(returncode)
        log.info("app_exited", pid=proc.pid, status=status,
                 signal=signal.Signals(-returncode).name if returncode < 0 else None)
        return status

    async def _kill_app(self) -> None:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            self._signal(signal.SIGKILL)
            await proc.wait()

    # === signals ========================================================================
    def _stopping(self) -> bool:
        return self._stop.is_set() or self.sidecar.stopping.is_set()

    def _on_stop(self, sig: signal.Signals) -> None:
        if self._stop.is_set():
            self._signal(sig)  # a second Ctrl-C: the app gets it too, as at a terminal
            return
        self._stop_signal = sig
        self._stop.set()

    def _on_forward(self, sig: signal.Signals) -> None:
        if sig == signal.SIGHUP:
            task = asyncio.get_running_loop().create_task(self._reload())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._signal(sig)

    async def _reload(self) -> None:
        await self.sidecar.reload()

    def _signal(self, sig: signal.Signals) -> None:
        """To the app's whole process group (a shell wrapper and its children)."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass  # exited meanwhile; its returncode arrives with the next loop turn
