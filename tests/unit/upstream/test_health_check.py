"""Active health checks against real loopback servers (port 0) that answer 200, 503 or hang."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from certs.ssl_context import TlsContextSource, TlsFiles, client_context, server_context
from tests.helpers.pki import make_test_pki
from sidecar.config.health import HealthCheckConfig
from sidecar.config.load import parse_mesh
from sidecar.upstream.endpoint import EndpointState
from sidecar.tls import SidecarTls
from sidecar.upstream.cluster_manager import ClusterManager
from sidecar.upstream.health_check import HealthChecker, HealthThresholds, ProbeResult, probe

WAIT = 5.0  # an upper bound for events; tests finish as soon as they fire


class Upstream:
    """A tiny HTTP/1.1 server whose answer the test sets: a status, "hang", "close" or "junk"."""

    def __init__(self, mode: str = "200") -> None:
        self.mode = mode
        self.requests: list[bytes] = []
        self.address: tuple[str, int] = ("", 0)
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> Upstream:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=ssl_context)
        self.address = self._server.sockets[0].getsockname()[:2]
        return self

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        if self._handlers:  # hanging handlers end when the prober hangs up
            await asyncio.wait(self._handlers, timeout=WAIT)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            if self.mode == "close":
                return
            self.requests.append(await reader.readuntil(b"\r\n\r\n"))
            if self.mode == "hang":
                await reader.read()  # until the prober gives up and closes
            elif self.mode == "junk":
                writer.write(b"SSH-2.0-OpenSSH\r\n")
            else:
                writer.write(b"HTTP/1.1 %s X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                             % self.mode.encode())
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()


MakeUpstream = Callable[..., Awaitable[Upstream]]


@pytest.fixture
async def upstreams() -> AsyncIterator[MakeUpstream]:
    started: list[Upstream] = []

    async def make(mode: str = "200", ssl_context: ssl.SSLContext | None = None) -> Upstream:
        upstream = await Upstream(mode).start(ssl_context)
        started.append(upstream)
        return upstream

    yield make
    for upstream in started:
        await upstream.close()


def config(**kw: object) -> HealthCheckConfig:
    base: dict[str, object] = {"path": "/healthz", "interval": 0.01, "jitter": 0.0, "timeout": 0.3,
                               "healthy_threshold": 2, "unhealthy_threshold": 3}
    base.update(kw)
    return HealthCheckConfig(**base)  # type: ignore[arg-type]


# --- probe ----------------------------------------------------------------------------


async def test_probe_sends_a_small_get_and_reads_the_status(upstreams: MakeUpstream) -> None:
    up = await upstreams("200")
    result = await probe(up.address, "/healthz", 1.0, host="orders")
    assert result == ProbeResult(200)
    head = up.requests[0]
    assert head.startswith(b"GET /healthz HTTP/1.1\r\n")
    assert b"\r\nHost: orders\r\n" in head
    assert b"\r\nConnection: close\r\n" in head
    assert b"\r\nUser-Agent: pake-health-check\r\n" in head


async def test_probe_reports_a_failing_status(upstreams: MakeUpstream) -> None:
    up = await upstreams("503")
    result = await probe(up.address, "/", 1.0)
    assert result.status == 503 and not result.passed(config())
    assert b"\r\nHost: 127.0.0.1:%d\r\n" % up.address[1] in up.requests[0]


async def test_probe_times_out_on_a_hanging_endpoint(upstreams: MakeUpstream) -> None:
    up = await upstreams("hang")
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert await probe(up.address, "/", 0.2) == ProbeResult(None, "timeout")
    assert loop.time() - start < 1.0


async def test_probe_of_a_closing_or_junk_endpoint(upstreams: MakeUpstream) -> None:
    closing = await upstreams("close")
    result = await probe(closing.address, "/", 1.0)
    assert result.status is None and result.error is not None
    junk = await upstreams("junk")
    assert await probe(junk.address, "/", 1.0) == ProbeResult(None, "bad status line")


async def test_probe_over_mtls(upstreams: MakeUpstream, tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path, ("orders", "frontend"))
    s, c = pki.services["orders"], pki.services["frontend"]
    up = await upstreams("204", server_context(s.cert, s.key, s.bundle))
    result = await probe(up.address, "/ready", 2.0, ssl=client_context(c.cert, c.key, c.bundle),
                         server_hostname="orders")
    assert result == ProbeResult(204)


# --- thresholds (pure) ----------------------------------------------------------------


def test_thresholds_flip_only_after_enough_in_a_row() -> None:
    t = HealthThresholds(healthy_threshold=2, unhealthy_threshold=3)
    assert [t.observe(False), t.observe(False), t.observe(True)] == [None, None, None]
    assert [t.observe(False), t.observe(False), t.observe(False)] == [None, None, False]
    assert t.observe(False) is None  # already down: no second flip
    assert [t.observe(True), t.observe(False), t.observe(True)] == [None, None, None]
    assert t.observe(True) is True
    assert not HealthThresholds(1, 1, healthy=False).healthy


# --- the checker ----------------------------------------------------------------------


async def test_check_once_marks_down_after_unhealthy_threshold_and_up_after_healthy(
        upstreams: MakeUpstream) -> None:
    up = await upstreams("503")
    endpoint = EndpointState(up.address)
    changes: list[bool] = []
    checker = HealthChecker("orders", config(), [endpoint],
                            on_change=lambda e, healthy: changes.append(healthy))
    for _ in range(2):
        await checker.check_once()
    assert endpoint.healthy and changes == []
    await checker.check_once()
    assert not endpoint.healthy and changes == [False]
    up.mode = "200"
    await checker.check_once()
    assert not endpoint.healthy
    await checker.check_once()
    assert endpoint.healthy and changes == [False, True]
    assert checker.snapshot() == [{"address": endpoint.address_text, "healthy": True,
                                   "last_status": 200, "last_error": None}]


async def test_running_checker_marks_an_endpoint_down_and_up(upstreams: MakeUpstream) -> None:
    up = await upstreams("503")
    endpoint = EndpointState(up.address)
    down, back = asyncio.Event(), asyncio.Event()
    served_when_down: list[int] = []

    def on_change(e: EndpointState, healthy: bool) -> None:
        if not healthy:
            served_when_down.append(len(up.requests))
            up.mode = "200"  # recovers right after being marked down
            down.set()
        else:
            served_when_down.append(len(up.requests))
            back.set()

    checker = HealthChecker("orders", config(), [endpoint], on_change=on_change)
    checker.start()
    try:
        async with asyncio.timeout(WAIT):
            await down.wait()
            await back.wait()
    finally:
        await checker.stop()
    assert served_when_down == [3, 5]  # 3 failures to go down, then 2 passes to come back
    assert endpoint.healthy


async def test_a_hanging_endpoint_goes_down_the_others_stay_up(upstreams: MakeUpstream) -> None:
    good, hung = await upstreams("200"), await upstreams("hang")
    endpoints = [EndpointState(good.address), EndpointState(hung.address)]
    down = asyncio.Event()
    changes: list[tuple[tuple[str, int], bool]] = []

    def on_change(e: EndpointState, healthy: bool) -> None:
        changes.append((e.address, healthy))
        down.set()

    checker = HealthChecker("orders", config(timeout=0.05, unhealthy_threshold=2), endpoints,
                            on_change=on_change)
    checker.start()
    try:
        async with asyncio.timeout(WAIT):
            await down.wait()
    finally:
        await checker.stop()
    assert changes == [(hung.address, False)]
    assert endpoints[0].healthy and not endpoints[1].healthy
    assert checker.results[hung.address].error == "timeout"


async def test_update_endpoints_forgets_the_ones_that_left(upstreams: MakeUpstream) -> None:
    one, two = await upstreams("503"), await upstreams("503")
    a, b = EndpointState(one.address), EndpointState(two.address)
    checker = HealthChecker("orders", config(), [a, b])
    await checker.check_once()
    await checker.check_once()
    checker.update_endpoints([b])
    assert list(checker.results) == [b.address]
    checker.update_endpoints([a, b])
    await checker.check_once()
    assert a.healthy  # a came back with a fresh count: one failure is not three
    assert not b.healthy  # b kept its count: this was its third


async def test_next_delay_stays_within_jitter() -> None:
    checker = HealthChecker("orders", config(interval=1.0, jitter=0.2), [],
                            rand=iter([0.0, 1.0, 0.5]).__next__)
    assert [checker.next_delay() for _ in range(3)] == pytest.approx([0.8, 1.2, 1.0])


async def test_stop_is_idempotent() -> None:
    checker = HealthChecker("orders", config(), [])
    await checker.stop()
    checker.start()
    await checker.stop()
    await checker.stop()


async def test_stop_does_not_swallow_its_own_cancellation() -> None:
    checker = HealthChecker("orders", config(interval=10.0, jitter=5.0), [])
    checker.start()
    stopper = asyncio.create_task(checker.stop())
    await asyncio.sleep(0)  # let stop() reach its await
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopper


# --- identity over mTLS ---------------------------------------------------------------
# A probe checks who answered as a request does (router._send): an endpoint with a valid mesh
# certificate of another service would be refused by every request (503 UPE), so it is down.


def _sidecar_tls(files: TlsFiles, service: str) -> SidecarTls:
    return SidecarTls(TlsContextSource(files), "pake.local", service, CollectorRegistry())


async def test_probe_refuses_an_endpoint_proving_another_service(upstreams: MakeUpstream,
                                                                 tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path, ("orders", "payments", "frontend"))
    s = pki.services["payments"]  # valid, same CA, but not the cluster's service
    up = await upstreams("200", server_context(s.cert, s.key, s.bundle))
    tls = _sidecar_tls(pki.services["frontend"], "frontend")
    result = await probe(up.address, "/healthz", 2.0, ssl=tls.client_context(),
                         server_hostname="orders.pake.local",
                         expected_identity="spiffe://pake.local/service/orders",
                         identify=tls.identify_for(up.address))
    assert result == ProbeResult(None, "identity: presented spiffe://pake.local/service/payments,"
                                       " expected spiffe://pake.local/service/orders")
    assert up.requests == []  # nothing is sent to an endpoint that is not who it must be


async def test_cluster_health_check_marks_a_wrong_identity_endpoint_down(
        upstreams: MakeUpstream, tmp_path: Path) -> None:
    """Through ClusterManager as the sidecar builds it: the right service stays up, an endpoint
    that proves another mesh service goes down, and /clusters shows why."""
    pki = make_test_pki(tmp_path, ("orders", "payments", "frontend"))
    right, wrong = pki.services["orders"], pki.services["payments"]
    good = await upstreams("200", server_context(right.cert, right.key, right.bundle))
    impostor = await upstreams("200", server_context(wrong.cert, wrong.key, wrong.bundle))
    tls = _sidecar_tls(pki.services["frontend"], "frontend")
    manager = ClusterManager(asyncio.get_running_loop(), client_tls=tls.client_context, tls=tls)
    mesh = parse_mesh({"services": {"orders": {
        "endpoints": [f"127.0.0.1:{good.address[1]}", f"127.0.0.1:{impostor.address[1]}"],
        "health_check": {"path": "/healthz", "interval": "1h", "jitter": "0ms", "timeout": "2s",
                         "healthy_threshold": 1, "unhealthy_threshold": 1}}}})
    manager.activate(manager.build(mesh, "frontend", None, mesh_tls=True))
    try:
        checker = manager.clusters["orders"].health
        assert checker is not None
        await checker.check_once()
        by_address = {e.address: e for e in manager.clusters["orders"].endpoints}
        assert by_address[good.address].healthy
        assert not by_address[impostor.address].healthy
        assert checker.results[good.address] == ProbeResult(200)
        error = checker.results[impostor.address].error
        assert error is not None and "presented spiffe://pake.local/service/payments" in error
        assert good.requests and impostor.requests == []  # (update() also started its own round)
    finally:
        await manager.close()
