"""Simulated sidecars for the push fan-out benchmark: many in one process, each one real.

Each simulated sidecar does what a sidecar does towards the control plane, and nothing else:
it makes its key and CSR locally, joins with a token over TLS verified by the bundle that the
token's CA fingerprint vouches for, opens its own WebSocket over mTLS with its own certificate,
says hello, acks every snapshot (recording when), answers ``renew`` with a new key's CSR and
sends heartbeats at the interval the control plane asks for. It does not validate snapshots
with ``parse_mesh``: that is the sidecar's CPU, not the control plane's, and this process shares
the machine with the control plane being measured.

Driven by ``bench/fanout.py`` over JSON lines: the spec file names the sidecars and tokens;
stdout reports progress (``joined``, ``connected``, ``ready``) and answers; stdin carries the
commands ``arm`` (report when every sidecar acked a config version), ``extra`` (connect the
sidecars held back, to probe the stream bound) and ``stop``. Times are ``time.monotonic()``,
which on Linux is one clock for every process of the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from certs.issue import make_csr, new_key
from certs.pem import key_to_pem
from sidecar.discovery.protocol import (
    MAX_MESSAGE_BYTES,
    Ack,
    Certificate,
    Csr,
    ErrorMessage,
    Heartbeat,
    Hello,
    JoinToken,
    ProtocolError,
    Renew,
    Snapshot,
    decode,
    encode,
)

__all__ = ["SimSpec", "Sim", "config_version"]

JOIN_CONCURRENCY = 8  # joins in flight per process (each token's joins still go one at a time)
CONNECT_CONCURRENCY = 32  # stream handshakes in flight per process
STEP_TIMEOUT = 30.0  # one join or one stream set-up


@dataclass(frozen=True, slots=True)
class SimSpec:
    service: str
    node: str
    address: str
    token: str
    extra: bool = False  # held back to probe the stream bound (connects on ``extra``)


def config_version(snapshot_version: str) -> int | None:
    """The applied config version a snapshot version (``<config>.<digest>``) was built from."""
    head = snapshot_version.partition(".")[0]
    return int(head) if head.isdigit() else None


def emit(event: str, **fields: Any) -> None:
    """One JSON line to the coordinator (a pipe it reads continuously)."""
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


class Sim:
    """One simulated sidecar: its identity, its stream, and when it acked each config version."""

    def __init__(self, spec: SimSpec, workdir: Path, on_change: Callable[[], None]) -> None:
        self.spec = spec
        self.chain_path = workdir / f"{spec.service}-{spec.node}.pem"
        self._on_change = on_change
        self.trust_domain = "pake.local"
        self.bundle = ""
        self.ctx: ssl.SSLContext | None = None
        self.ws: ClientConnection | None = None
        self.acked: dict[int, float] = {}  # config version -> monotonic time the ack was sent
        self.closed: str | None = None
        self.snapshot_bytes = 0  # the size of the last snapshot frame
        self._next_key = b""  # the key behind the CSR sent last (renewal)
        self._tasks: list[asyncio.Task[None]] = []

    async def join(self, http: aiohttp.ClientSession, listen: str, bundle: str,
                   trust_domain: str, verified: ssl.SSLContext) -> None:
        self.bundle, self.trust_domain = bundle, trust_domain
        key = new_key()
        csr = make_csr(key, self.spec.service, trust_domain).decode()
        async with http.post(f"https://{listen}/v1/join", ssl=verified,
                             json={"token": self.spec.token, "service": self.spec.service,
                                   "csr": csr}) as r:
            reply = await r.json()
            if r.status != 200:
                raise RuntimeError(f"join {self.spec.service}/{self.spec.node}: {r.status} {reply}")
        # One file with key and chain: a benchmark's scratch directory, not a sidecar's state.
        self.chain_path.write_bytes(key_to_pem(key) + reply["certificate"].encode())
        ctx = ssl.create_default_context(cadata=bundle)
        ctx.check_hostname = False
        ctx.load_cert_chain(self.chain_path)
        self.ctx = ctx

    async def connect(self, listen: str) -> None:
        """Open the stream and say hello; InvalidStatus when the control plane refuses it."""
        assert self.ctx is not None
        self.ws = await connect(f"wss://{listen}/v1/stream", ssl=self.ctx,
                                max_size=MAX_MESSAGE_BYTES, ping_interval=None,
                                open_timeout=STEP_TIMEOUT)
        await self.ws.send(encode(Hello(node=self.spec.node, service=self.spec.service,
                                        address=self.spec.address)))
        self._tasks.append(asyncio.create_task(self._read()))

    async def _read(self) -> None:
        assert self.ws is not None
        try:
            async for frame in self.ws:
                message = decode(frame)
                if isinstance(message, Snapshot):
                    self.snapshot_bytes = len(frame)
                await self._answer(message)
        except (OSError, ProtocolError) as exc:
            self.closed = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # websockets' ConnectionClosed and kin: the stream ended
            self.closed = f"{type(exc).__name__}: {exc}"
        else:
            self.closed = "closed by the control plane"
        self._on_change()

    async def _answer(self, message: Any) -> None:
        assert self.ws is not None
        if isinstance(message, Snapshot):
            await self.ws.send(encode(Ack(version=message.version)))
            version = config_version(message.version)
            if version is not None:
                self.acked.setdefault(version, time.monotonic())
                self._on_change()
        elif isinstance(message, Heartbeat) and message.interval is not None:
            if not any(t.get_name() == "heartbeat" for t in self._tasks):
                self._tasks.append(asyncio.create_task(self._heartbeats(message.interval),
                                                       name="heartbeat"))
        elif isinstance(message, Renew):
            key = new_key()
            self._next_key = key_to_pem(key)
            await self.ws.send(encode(Csr(csr=make_csr(key, self.spec.service,
                                                       self.trust_domain).decode())))
        elif isinstance(message, Certificate):
            self.chain_path.write_bytes(self._next_key + message.cert.encode())
            await self.ws.send(encode(Ack(version=message.version, kind="certificate")))
        elif isinstance(message, ErrorMessage):
            self.closed = f"error {message.code}: {message.detail}"

    async def _heartbeats(self, interval: float) -> None:
        assert self.ws is not None
        await asyncio.sleep(random.uniform(0, interval))  # spread the mesh's heartbeats out
        while True:
            await self.ws.send(encode(Heartbeat(app_healthy=True)))
            await asyncio.sleep(interval)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.ws is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await self.ws.close()


class Worker:
    """The sidecars of one process and the commands of the coordinator."""

    def __init__(self, listen: str, specs: list[SimSpec], workdir: Path) -> None:
        self.listen = listen
        self.sims = [Sim(s, workdir, self._changed) for s in specs]
        self._change = asyncio.Event()

    def _changed(self) -> None:
        self._change.set()

    async def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not predicate():
                    self._change.clear()
                    await self._change.wait()
        return predicate()

    def regular(self) -> list[Sim]:
        return [s for s in self.sims if not s.spec.extra]

    async def join_all(self) -> None:
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        connector = aiohttp.TCPConnector(limit=JOIN_CONCURRENCY)
        async with aiohttp.ClientSession(connector=connector) as http:
            # First contact: trust the bundle only when it holds the CA every token names.
            async with http.get(f"https://{self.listen}/v1/bundle", ssl=insecure) as r:
                body = await r.json()
            bundle, trust_domain = body["bundle"], body["trust_domain"]
            for token in {s.spec.token for s in self.sims}:
                if not JoinToken.parse(token).trusts(bundle):
                    raise RuntimeError("the control plane's bundle does not hold the token's CA")
            verified = ssl.create_default_context(cadata=bundle)
            verified.check_hostname = False
            by_token: dict[str, list[Sim]] = {}
            for sim in self.sims:
                by_token.setdefault(sim.spec.token, []).append(sim)
            gate = asyncio.Semaphore(JOIN_CONCURRENCY)
            joined = 0

            async def chain(sims: list[Sim]) -> None:
                # One token's uses are taken one at a time: concurrent joins on one token
                # would only race for its use counter.
                nonlocal joined
                for sim in sims:
                    async with gate, asyncio.timeout(STEP_TIMEOUT):
                        await sim.join(http, self.listen, bundle, trust_domain, verified)
                    joined += 1
                    emit("joined", n=joined)

            await asyncio.gather(*(chain(sims) for sims in by_token.values()))

    async def connect_all(self, sims: list[Sim]) -> list[dict[str, Any]]:
        """Connect ``sims``; returns one outcome per sidecar (refusals with status and body)."""
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
        outcomes: list[dict[str, Any]] = []

        async def one(sim: Sim) -> None:
            started = time.monotonic()
            async with gate:
                try:
                    await sim.connect(self.listen)
                except InvalidStatus as exc:
                    body = exc.response.body or b""
                    outcomes.append({"node": sim.spec.node, "status": exc.response.status_code,
                                     "body": body.decode(errors="replace")[:500],
                                     "ms": (time.monotonic() - started) * 1000})
                    return
            outcomes.append({"node": sim.spec.node, "status": 101,
                             "ms": (time.monotonic() - started) * 1000})
            emit("connected", n=sum(1 for o in outcomes if o["status"] == 101))

        await asyncio.gather(*(one(s) for s in sims))
        return outcomes

    async def run(self) -> None:
        t0 = time.monotonic()
        await self.join_all()
        emit("all_joined", seconds=time.monotonic() - t0)
        regular = self.regular()
        outcomes = await self.connect_all(regular)
        refused = [o for o in outcomes if o["status"] != 101]
        # Ready once every stream holds the config applied before the benchmark (version 1).
        ok = await self.wait_until(lambda: all(1 in s.acked or s.closed for s in regular), 60)
        emit("ready", ok=ok, refused=refused, closed=[s.closed for s in regular if s.closed][:5])
        reader = await stdin_reader()
        while line := await reader.readline():
            cmd = json.loads(line)
            if cmd["cmd"] == "arm":
                await self.report_acks(int(cmd["version"]), float(cmd["timeout"]))
            elif cmd["cmd"] == "extra":
                extra = [s for s in self.sims if s.spec.extra]
                emit("extra", outcomes=await self.connect_all(extra))
            elif cmd["cmd"] == "stop":
                break
        await asyncio.gather(*(s.close() for s in self.sims))

    async def report_acks(self, version: int, timeout: float) -> None:
        emit("armed", version=version)
        regular = [s for s in self.regular() if s.ws is not None]
        await self.wait_until(lambda: all(version in s.acked or s.closed for s in regular),
                              timeout)
        emit("acked", version=version, times=[s.acked[version] for s in regular if version in s.acked],
             missing=[s.spec.node for s in regular if version not in s.acked],
             snapshot_bytes=max((s.snapshot_bytes for s in regular), default=0),
             closed=[s.closed for s in regular if s.closed][:5])


async def stdin_reader() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fanout_client", description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", required=True, help="the control plane's listen address host:port")
    p.add_argument("--spec", type=Path, required=True, help="JSON list of sidecars (SimSpec fields)")
    p.add_argument("--workdir", type=Path, required=True, help="where the certificates go")
    args = p.parse_args(argv)
    specs = [SimSpec(**s) for s in json.loads(args.spec.read_text())]
    args.workdir.mkdir(parents=True, exist_ok=True)

    async def run() -> None:
        await Worker(args.listen, specs, args.workdir).run()

    import uvloop

    uvloop.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
