"""``python -m bench.discovery``: from a new endpoint registering to the first request another
sidecar routes to it (issue 9; the seed's "discovery < 10 ms").

One real ``pakectl serve`` and one joined caller sidecar (``frontend``) under steady load: a
few clients in this process send requests through its outbound listener, all the time, to the
service being measured. Each repetition is a service that has no endpoint yet (``svc-N``: the
caller answers 503 until it has one): a new sidecar for it joins, with a fresh upstream app of
this process in front of which it sits; the upstream notes when the first request arrives.

Measured per repetition, on the machine's one wall clock (log timestamps and ``time.time()``):
``registered`` — the control plane's ``endpoint_registered`` line (the endpoint is in the
store) — to ``first request`` at the upstream; and where the time goes: to the control plane's
next ``push`` (the debounce), to the caller's ``config_applied`` (send, validate, swap), to the
first request (the next request of the load, the mTLS connection, the new sidecar's hop).
The first repetition warms up and is not counted. Results: a table and the ``discovery`` key of
``bench/results.json``. Every process it starts is stopped at the end, also on error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from .procs import Proc, Processes, json_event
from .sidecars import argv as sidecar_argv

__all__ = ["DiscoverySettings", "render", "run", "main"]

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO / "bench" / "results.json"
TARGET_MS = 10.0  # the seed: discovery < 10 ms
Log = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class DiscoverySettings:
    repetitions: int = 5  # measured; one more warms up
    clients: int = 2  # concurrent load clients through the caller
    timeout: float = 20.0  # per repetition: join, registration, first request


def _ts(line: dict[str, Any]) -> float:
    """A log line's ISO timestamp as unix seconds."""
    return datetime.fromisoformat(str(line["timestamp"])).timestamp()


def _events(proc: Proc, name: str) -> list[dict[str, Any]]:
    out = []
    match = json_event(name)
    with contextlib.suppress(OSError):
        for line in proc.stdout_path.read_text(errors="replace").splitlines():
            found = match(line)
            if isinstance(found, dict):
                out.append(found)
    return out


class _Upstream(asyncio.Protocol):
    """A tiny HTTP/1.1 app: 200 ``ok`` to every request (no bodies), the first arrival noted."""

    def __init__(self, first: Arrival) -> None:
        self.first = first
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.first.note()
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            self.buffer = self.buffer[end + 4:]
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        if len(self.buffer) > 65536:  # not what the sidecar sends: drop it
            assert self.transport is not None
            self.transport.close()


@dataclass
class Arrival:
    at: float | None = None
    event: asyncio.Event = field(default_factory=asyncio.Event)

    def note(self) -> None:
        if self.at is None:
            self.at = time.time()
            self.event.set()


@dataclass
class Load:
    """Clients sending requests through the caller to ``host``, back to back."""

    url: str
    host: str = ""
    sent: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def _client(self, http: aiohttp.ClientSession) -> None:
        while not self._stop.is_set():
            try:
                async with http.get(self.url, headers={"host": self.host}) as r:
                    await r.read()
                    self.statuses[r.status] = self.statuses.get(r.status, 0) + 1
            except aiohttp.ClientError:
                self.statuses[0] = self.statuses.get(0, 0) + 1
                await asyncio.sleep(0.001)
            self.sent += 1

    @contextlib.asynccontextmanager
    async def running(self, clients: int) -> Any:
        async with aiohttp.ClientSession() as http:
            tasks = [asyncio.create_task(self._client(http)) for _ in range(clients)]
            try:
                yield self
            finally:
                self._stop.set()
                await asyncio.gather(*tasks, return_exceptions=True)


def _write_sidecar(root: Path, name: str, service: str, listen: str, token: str,
                   listeners: dict[str, Any], app: str | None) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "join.token").write_text(token + "\n")
    doc: dict[str, Any] = {"service": service, "listeners": listeners,
                           "control": {"addresses": [listen], "token_file": "join.token",
                                       "state_dir": "state"},
                           "access_log": {"enabled": False}, "timeouts": {"drain": "1s"}}
    if app is not None:
        doc["app"] = app
    (d / "sidecar.yaml").write_text(yaml.safe_dump(doc))
    return d / "sidecar.yaml"


async def _admin(http: aiohttp.ClientSession, admin: str, method: str, path: str, body: Any = None) -> Any:
    async with http.request(method, f"http://{admin}{path}", json=body) as r:
        data = await r.json(content_type=None)
        if r.status != 200:
            raise RuntimeError(f"{method} {path}: {r.status} {data}")
        return data


def _services(n: int) -> Iterator[str]:
    return (f"svc-{i}" for i in range(n))


async def _run(settings: DiscoverySettings, root: Path, log: Log) -> dict[str, Any]:
    procs = Processes(root)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    reps = settings.repetitions + 1
    try:
        control = procs.start("control", [sys.executable, "-m", "control", "serve", "--state-dir",
                                          str(root / "state"), "--listen", "127.0.0.1:0",
                                          "--admin", "127.0.0.1:0"], cwd=REPO, env=env)
        serving = await asyncio.to_thread(control.wait_for_stdout, json_event("serving"), 30)
        assert isinstance(serving, dict)
        ports = dict(serving["ports"])
        admin, listen = f"127.0.0.1:{ports['admin']}", f"127.0.0.1:{ports['listen']}"
        # The caller's own routes lead nowhere else, so it gets every service (and calls them by Host).
        policy = {"default": "deny", "rules": [{"allow": {"from": ["frontend"]}}]}
        mesh = {"services": {"frontend": {}, **{s: {"policy": policy} for s in _services(reps)}}}
        async with aiohttp.ClientSession() as http:
            await _admin(http, admin, "POST", "/v1/config", {"mesh": mesh, "by": "bench"})
            tokens = {s: (await _admin(http, admin, "POST", "/v1/tokens", {"service": s}))["token"]
                      for s in ["frontend", *_services(reps)]}
        caller_cfg = _write_sidecar(root, "frontend", "frontend", listen, tokens["frontend"],
                                    {"outbound": "127.0.0.1:0", "admin": "127.0.0.1:0"}, None)
        caller = procs.start("frontend", sidecar_argv(caller_cfg), cwd=caller_cfg.parent, env=env)
        ready = await asyncio.to_thread(caller.wait_for_stdout, json_event("ready"), 30)
        assert isinstance(ready, dict)
        await asyncio.to_thread(caller.wait_for_stdout, json_event("config_applied"), 30)
        load = Load(f"http://127.0.0.1:{dict(ready['ports'])['outbound']}/")
        rows: list[dict[str, Any]] = []
        loop = asyncio.get_running_loop()
        async with load.running(settings.clients):
            for i, service in enumerate(_services(reps)):
                arrival = Arrival()
                server = await loop.create_server(lambda: _Upstream(arrival), "127.0.0.1", 0)
                app = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
                load.host = service
                sent_before = load.sent
                cfg = _write_sidecar(root, service, service, listen, tokens[service],
                                     {"inbound": {"address": "127.0.0.1:0", "tls": True},
                                      "admin": "127.0.0.1:0"}, app)
                new = procs.start(service, sidecar_argv(cfg), cwd=cfg.parent, env=env)
                try:
                    async with asyncio.timeout(settings.timeout):
                        await arrival.event.wait()
                    row = await _breakdown(control, caller, new, service, arrival, settings.timeout)
                    row["requests_meanwhile"] = load.sent - sent_before
                finally:
                    await asyncio.to_thread(procs.stop, new)
                    server.close()
                    await server.wait_closed()
                label = "warm-up" if i == 0 else f"{i}/{settings.repetitions}"
                log(f"  {label}: registered -> first request {row['total_ms']} ms (push "
                    f"+{row['to_push_ms']}, applied +{row['to_applied_ms']} / new +{row['new_applied_ms']}, "
                    f"routed +{row['to_first_ms']})")
                if i > 0:
                    rows.append(row)
        return {"repetitions": rows, "clients": settings.clients, "statuses": load.statuses,
                **summary(rows)}
    finally:
        await asyncio.to_thread(procs.stop_all)


async def _breakdown(control: Proc, caller: Proc, new: Proc, service: str, arrival: Arrival,
                     timeout: float) -> dict[str, Any]:
    """The log lines around this repetition (the writers may lag the arrival a little)."""
    deadline = time.monotonic() + timeout
    while True:
        regs = [e for e in _events(control, "endpoint_registered") if e.get("service") == service]
        if regs:
            registered = _ts(regs[0])
            push = next((_ts(e) for e in _events(control, "push") if _ts(e) >= registered), None)
            applied = next((_ts(e) for e in _events(caller, "config_applied")
                            if push is not None and _ts(e) >= push), None)
            # The new sidecar holds no config at its hello: it serves once its own snapshot is in.
            own = next((_ts(e) for e in _events(new, "config_applied")), None)
            if push is not None and applied is not None and own is not None:
                break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{service}: no endpoint_registered/push/config_applied lines")
        await asyncio.sleep(0.05)
    assert arrival.at is not None

    def ms(a: float, b: float) -> float:
        return round((b - a) * 1000, 2)

    return {"service": service, "total_ms": ms(registered, arrival.at), "to_push_ms": ms(registered, push),
            "to_applied_ms": ms(push, applied), "new_applied_ms": ms(push, own),
            "to_first_ms": ms(max(applied, own), arrival.at)}


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("total_ms", "to_push_ms", "to_applied_ms", "new_applied_ms", "to_first_ms"):
        values = [r[key] for r in rows]
        out[key] = {"p50": _pct(values, 0.5), "max": max(values)} if values else None
    worst = out["total_ms"]["max"] if rows else None
    out["target"] = {"target": f"discovery (registered -> first request routed) under {TARGET_MS:.0f} ms",
                     "p50_ms": out["total_ms"]["p50"] if rows else None, "max_ms": worst,
                     "pass": worst is not None and worst < TARGET_MS}
    return out


def run(settings: DiscoverySettings, log: Log) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="pake-discovery-") as tmp:
        return asyncio.run(_run(settings, Path(tmp), log))


def render(results: dict[str, Any]) -> str:
    lines = ["discovery (a new endpoint registered -> the first request another sidecar routes to it)",
             f"{'':>36} {'p50 ms':>8} {'max ms':>8}"]
    for key, name in (("total_ms", "registered -> first request"),
                      ("to_push_ms", "registered -> push (debounce)"),
                      ("to_applied_ms", "push -> caller applied it"),
                      ("new_applied_ms", "push -> new sidecar applied its own"),
                      ("to_first_ms", "both applied -> first request")):
        v = results[key]
        lines.append(f"{name:>36} {v['p50']:>8} {v['max']:>8}")
    t = results["target"]
    lines.append(f"target: {t['target']}: {'PASS' if t['pass'] else 'MISS'} "
                 f"(p50 {t['p50_ms']} ms, max {t['max_ms']} ms over {len(results['repetitions'])})")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser, prefix: str = "") -> None:
    d = DiscoverySettings()
    p.add_argument(f"--{prefix}repetitions", type=int, default=d.repetitions,
                   help=f"measured repetitions, after one warm-up (default {d.repetitions})")
    p.add_argument(f"--{prefix}clients", type=int, default=d.clients,
                   help=f"concurrent load clients through the caller (default {d.clients})")


def settings_from(args: argparse.Namespace, prefix: str = "") -> DiscoverySettings:
    reps, clients = (int(getattr(args, prefix.replace("-", "_") + name)) for name in ("repetitions", "clients"))
    if reps < 1 or clients < 1:
        raise SystemExit(f"bench: --{prefix}repetitions and --{prefix}clients must be positive")
    return DiscoverySettings(repetitions=reps, clients=clients)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.discovery", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                   help="results JSON; its discovery key is set (default bench/results.json)")
    args = p.parse_args(argv)
    results = run(settings_from(args), lambda msg: print(msg, flush=True))
    print()
    print(render(results))
    data: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads(args.output.read_text())
        data = loaded if isinstance(loaded, dict) else {}
    data["discovery"] = results
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
