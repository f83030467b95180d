"""Processes the benchmark starts, and what /proc says about them.

Every process runs in its own process group, its stdout and stderr go to files in the run's
temporary directory (a full pipe could stall a proxy mid-measurement), and ``Processes.stop_all``
stops them newest first: SIGTERM to the group, then SIGKILL after a grace period. ``run.py``
calls it from a ``finally``, so Ctrl-C and errors leave nothing behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable

__all__ = ["CLK_TCK", "Proc", "Processes", "StartError", "cpu_ticks", "cpu_times", "free_port", "memory_kb"]

CLK_TCK = os.sysconf("SC_CLK_TCK")


class StartError(RuntimeError):
    """A process did not come up; the message says which and shows the tail of its log."""


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    files: list[IO[bytes]] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 8) -> str:
        out = []
        for path in (self.stdout_path, self.stderr_path):
            try:
                text = path.read_text(errors="replace").strip().splitlines()[-lines:]
            except OSError:
                continue
            out.extend(text)
        return "\n".join(out)

    def wait_for_stdout(self, match: Callable[[str], object], timeout: float) -> object:
        """Poll the stdout file until ``match(line)`` returns something truthy for a line."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            try:
                lines = self.stdout_path.read_text(errors="replace").splitlines()
            except OSError:
                lines = []
            for line in lines[seen:]:
                found = match(line)
                if found:
                    return found
            # keep a partial last line for the next poll
            seen = max(seen, len(lines) - 1)
            if not self.alive():
                raise StartError(f"{self.name} exited with status {self.popen.returncode}:\n"
                                 f"{self.log_tail()}")
            if time.monotonic() > deadline:
                raise StartError(f"{self.name} not ready after {timeout:.0f}s:\n{self.log_tail()}")
            time.sleep(0.02)


class Processes:
    """The processes of one benchmark run; stop_all() is idempotent."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[Proc] = []
        self._count = 0

    def start(self, name: str, argv: list[str], *, cwd: Path | None = None,
              env: dict[str, str] | None = None) -> Proc:
        self._count += 1
        stem = f"{self._count:02d}-{name}"
        stdout_path = self.log_dir / f"{stem}.out"
        stderr_path = self.log_dir / f"{stem}.err"
        out = open(stdout_path, "wb")
        err = open(stderr_path, "wb")
        try:
            popen = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=err, start_new_session=True)
        except BaseException:
            out.close()
            err.close()
            raise
        proc = Proc(name, popen, stdout_path, stderr_path, [out, err])
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, grace: float = 5.0) -> None:
        if proc.alive():
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.popen.wait(timeout=5)
        else:
            proc.popen.wait()
        # a child the process left behind in its group
        _signal_group(proc, signal.SIGKILL)
        for f in proc.files:
            f.close()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            try:
                self.stop(proc)
            except Exception:  # keep stopping the others
                pass


def _signal_group(proc: Proc, sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)  # start_new_session: the group id is the pid
    except (ProcessLookupError, PermissionError):
        pass


def cpu_times(pid: int) -> tuple[int, int]:
    """utime and stime of the process (all its threads), in clock ticks: its own code's time
    and the kernel's on its behalf (syscalls, the network stack)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    # the command name (field 2) may hold spaces; the fields after it start past the last ")"
    fields = data[data.rindex(b")") + 2:].split()
    return int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)


def cpu_ticks(pid: int) -> int:
    """utime + stime of the process (all its threads), in clock ticks."""
    return sum(cpu_times(pid))


def memory_kb(pid: int) -> dict[str, int]:
    """VmHWM (peak resident set) and VmRSS, in KiB; and Anonymous: the pages the process
    allocated itself (objects, heap, buffers, stacks), where RSS also counts the pages of
    libraries it mapped, which the page cache shares with every process on the host (and a
    file's pages not yet written back count as private dirty: anonymous does not move with a
    fresh build)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0])
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:  # (Linux 4.14 and later)
            for line in f:
                key, _, value = line.partition(":")
                if key == "Anonymous":
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def free_port() -> int:
    """A free loopback port, for programs that cannot bind port 0 and report it (HAProxy).

    Racy by nature (the port is free now, not necessarily when the program binds it); the
    caller checks the program came up.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(proc: Proc, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            pass
        if not proc.alive():
            raise StartError(f"{proc.name} exited with status {proc.popen.returncode}:\n{proc.log_tail()}")
        if time.monotonic() > deadline:
            raise StartError(f"{proc.name}: nothing listening on 127.0.0.1:{port} after {timeout:.0f}s")
        time.sleep(0.02)


def json_event(name: str) -> Callable[[str], dict[str, object] | None]:
    """A ``wait_for_stdout`` matcher for a JSON log line with ``"event": name``."""

    def match(line: str) -> dict[str, object] | None:
        if '"event"' not in line:
            return None
        try:
            data = json.loads(line)
        except ValueError:
            return None
        return data if isinstance(data, dict) and data.get("event") == name else None

    return match
