"""Active health checks: one asyncio task per cluster probes every endpoint each interval.

A probe is ``GET <path> HTTP/1.1`` over a fresh connection (``Connection: close``; TLS when an
``ssl.SSLContext`` is given) and reads only the status line, all within one timeout. Whether
an endpoint flips is decided by ``HealthThresholds`` (pure: consecutive passes or failures
against the thresholds), so the rules are testable without sockets. ``probe`` is also what the
sidecar uses to check its own app for ``/readyz``. No aiohttp: the sidecar stays lean.

Over mTLS a probe checks who answered exactly as a request does (the router's ``_send``): the
endpoint's certificate must carry the cluster's SPIFFE ID, else the probe fails with an
``identity`` error before anything is sent. A valid mesh certificate of another service does
not keep an endpoint in rotation that every request to it would refuse (503 ``UPE``).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl as _ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import structlog

from certs.tasks import stop_task

from ..config.model import Address
from ..config.resilience import HealthCheckConfig
from .endpoint import EndpointState

__all__ = ["HealthChecker", "HealthThresholds", "ProbeResult", "probe"]

log = structlog.get_logger("pake.cluster.health")

# transport -> the SPIFFE ID the peer proved, or None (``sidecar.tls.SidecarTls.identify_for``)
Identify = Callable[[object], str | None]

USER_AGENT = "pake-health-check"
MAX_STATUS_LINE = 8 * 1024  # an answer that long is not HTTP; do not buffer more


@dataclass(frozen=True, slots=True)
class ProbeResult:
    status: int | None  # None: no status line (see ``error``)
    error: str | None = None  # "timeout", "connect: ...", "identity: ...", "closed", "bad status line"

    def passed(self, config: HealthCheckConfig) -> bool:
        return self.status is not None and config.expects(self.status)


async def probe(address: Address, path: str, timeout: float, *,
                ssl: _ssl.SSLContext | None = None, host: str | None = None,
                server_hostname: str | None = None, expected_identity: str | None = None,
                identify: Identify | None = None) -> ProbeResult:
    """One ``GET path`` to ``address``: connect, send, read the status line, all within
    ``timeout`` seconds. Never raises for network trouble: the result says what happened.

    With ``expected_identity`` (mTLS), ``identify(transport)`` must return exactly that SPIFFE
    ID after the handshake; otherwise the probe fails without sending the request. A missing
    ``identify`` proves nothing, so it fails too (never trust an unchecked peer)."""
    hostname, port = address
    host_header = host or (f"[{hostname}]:{port}" if ":" in hostname else f"{hostname}:{port}")
    request = (f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nConnection: close\r\n"
               f"User-Agent: {USER_AGENT}\r\n\r\n").encode("latin-1")
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            try:
                if ssl is not None:
                    reader, writer = await asyncio.open_connection(
                        hostname, port, ssl=ssl, limit=MAX_STATUS_LINE,
                        server_hostname=server_hostname or hostname)
                else:
                    reader, writer = await asyncio.open_connection(
                        hostname, port, limit=MAX_STATUS_LINE)
            except OSError as exc:  # includes ssl.SSLError
                return ProbeResult(None, f"connect: {exc.strerror or exc}")
            if expected_identity is not None:
                presented = identify(writer.transport) if identify is not None else None
                if presented != expected_identity:
                    return ProbeResult(None, f"identity: presented {presented or 'no identity'},"
                                             f" expected {expected_identity}")
            writer.write(request)
            await writer.drain()
            line = await reader.readline()
    except TimeoutError:
        return ProbeResult(None, "timeout")
    except (OSError, ValueError) as exc:  # ValueError: the line went past the limit
        return ProbeResult(None, f"read: {exc}")
    finally:
        if writer is not None:
            await _close(writer, timeout)
    if not line:
        return ProbeResult(None, "closed")
    return _status_line(line)


def _status_line(line: bytes) -> ProbeResult:
    parts = line.split(None, 2)
    if (len(parts) >= 2 and parts[0].startswith(b"HTTP/1.") and len(parts[1]) == 3
            and parts[1].isdigit()):
        return ProbeResult(int(parts[1]))
    return ProbeResult(None, "bad status line")


async def _close(writer: asyncio.StreamWriter, timeout: float) -> None:
    writer.close()
    # A peer that never answers the TLS close must not hold the probe past its budget.
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(timeout):
            await writer.wait_closed()


class HealthThresholds:
    """An endpoint's verdict from consecutive probe results: ``unhealthy_threshold`` failures in
    a row mark it down, ``healthy_threshold`` passes in a row mark it up. Pure."""

    __slots__ = ("healthy_threshold", "unhealthy_threshold", "healthy", "_passes", "_failures")

    def __init__(self, healthy_threshold: int, unhealthy_threshold: int,
                 healthy: bool = True) -> None:
        self.healthy_threshold = healthy_threshold
        self.unhealthy_threshold = unhealthy_threshold
        self.healthy = healthy
        self._passes = 0
        self._failures = 0

    def observe(self, passed: bool) -> bool | None:
        """One probe result; the new verdict when it flipped, else ``None``."""
        if passed:
            self._failures = 0
            self._passes = min(self._passes + 1, self.healthy_threshold)
            if not self.healthy and self._passes >= self.healthy_threshold:
                self.healthy = True
                return True
        else:
            self._passes = 0
            self._failures = min(self._failures + 1, self.unhealthy_threshold)
            if self.healthy and self._failures >= self.unhealthy_threshold:
                self.healthy = False
                return False
        return None


HealthCallback = Callable[[EndpointState, bool], None]


def _ignore(endpoint: EndpointState, healthy: bool) -> None:
    pass


class HealthChecker:
    """The active health checks of one cluster. ``start()`` runs a task; ``stop()`` ends it.
    Sets ``EndpointState.healthy`` and calls ``on_change(endpoint, healthy)`` on each flip.

    ``expected_identity`` is the SPIFFE ID every endpoint must prove (mTLS clusters), and
    ``identify(address)`` gives the same ``identify(transport)`` the endpoint's pool uses."""

    def __init__(self, cluster: str, config: HealthCheckConfig, endpoints: Iterable[EndpointState],
                 *, on_change: HealthCallback | None = None,
                 ssl: _ssl.SSLContext | Callable[[], _ssl.SSLContext | None] | None = None,
                 server_hostname: str | None = None,
                 expected_identity: str | None = None,
                 identify: Callable[[Address], Identify | None] | None = None,
                 rand: Callable[[], float] | None = None) -> None:
        self.cluster = cluster
        self.config = config
        self.results: dict[Address, ProbeResult] = {}  # the last probe of each endpoint
        self._on_change = on_change or _ignore
        self._ssl = ssl
        self._server_hostname = server_hostname
        self._expected_identity = expected_identity
        self._identify = identify
        self._rand = rand if rand is not None else random.Random().random
        self._endpoints: list[EndpointState] = []
        self._thresholds: dict[Address, HealthThresholds] = {}
        self._task: asyncio.Task[None] | None = None
        self.update_endpoints(endpoints)

    def update_endpoints(self, endpoints: Iterable[EndpointState]) -> None:
        """A new snapshot's endpoints. Counts of addresses that stay are kept; the others
        are dropped, so memory follows the cluster's size."""
        self._endpoints = list(endpoints)
        keep = {e.address for e in self._endpoints}
        self._thresholds = {a: t for a, t in self._thresholds.items() if a in keep}
        self.results = {a: r for a, r in self.results.items() if a in keep}

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"health_check:{self.cluster}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)

    def next_delay(self) -> float:
        """interval ± jitter: sidecars that started together drift apart instead of probing
        an endpoint in lockstep."""
        cfg = self.config
        return max(0.0, cfg.interval + (2.0 * self._rand() - 1.0) * cfg.jitter)

    async def check_once(self) -> None:
        """One round: probe every endpoint at once and apply the results."""
        endpoints = self._endpoints
        async with asyncio.TaskGroup() as tg:
            for endpoint in endpoints:
                tg.create_task(self._check(endpoint))

    async def _check(self, endpoint: EndpointState) -> None:
        cfg = self.config
        context = self._ssl() if callable(self._ssl) else self._ssl
        identify = self._identify(endpoint.address) if self._identify is not None else None
        result = await probe(endpoint.address, cfg.path, cfg.timeout, ssl=context,
                             host=cfg.host or self.cluster, server_hostname=self._server_hostname,
                             expected_identity=self._expected_identity, identify=identify)
        if endpoint not in self._endpoints:
            return  # left the cluster while we were probing it
        self.results[endpoint.address] = result
        thresholds = self._thresholds.get(endpoint.address)
        if thresholds is None:
            thresholds = HealthThresholds(cfg.healthy_threshold, cfg.unhealthy_threshold,
                                          endpoint.healthy)
            self._thresholds[endpoint.address] = thresholds
        flipped = thresholds.observe(result.passed(cfg))
        if flipped is not None:
            endpoint.healthy = flipped
            self._on_change(endpoint, flipped)

    async def _run(self) -> None:
        # The first round comes soon, not an interval late; a random offset spreads clusters.
        await asyncio.sleep(self._rand() * self.config.jitter)
        while True:
            try:
                await self.check_once()
            except Exception:  # noqa: BLE001 - a bug in one round must not stop health checking
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    # ... but a stop must: a probe that failed while the round was cancelled
                    # turns the cancellation into the TaskGroup's error, caught here
                    raise asyncio.CancelledError from None
                log.exception("health_check_error", cluster=self.cluster)
            await asyncio.sleep(self.next_delay())

    def snapshot(self) -> list[dict[str, object]]:
        return [{"address": e.address_text, "healthy": e.healthy,
                 "last_status": (r.status if (r := self.results.get(e.address)) else None),
                 "last_error": r.error if r else None}
                for e in self._endpoints]
