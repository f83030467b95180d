"""A session's outbox on a fake WebSocket: only the latest snapshot waits, and a sidecar that
stops reading is closed after the send timeout while another session keeps receiving."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from control.push import Built
from control.stream import SidecarSession, StreamLimits
from sidecar.discovery.protocol import Hello, Renew


class FakeTransport:
    def __init__(self) -> None:
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


class FakeRequest:
    def __init__(self) -> None:
        self.transport = FakeTransport()


class FakeWs:
    """send_str blocks while ``stuck`` (a peer that stopped reading), else records."""

    def __init__(self, stuck: bool = False) -> None:
        self.sent: list[str] = []
        self.stuck = stuck
        self.sent_event = asyncio.Event()

    async def send_str(self, text: str) -> None:
        if self.stuck:
            await asyncio.Event().wait()
        self.sent.append(text)
        self.sent_event.set()


class FakeCert:
    not_valid_before_utc = datetime.now(UTC) - timedelta(minutes=1)
    not_valid_after_utc = datetime.now(UTC) + timedelta(hours=24)


def session(ws: FakeWs, **limits: Any) -> tuple[SidecarSession, FakeRequest]:
    request = FakeRequest()
    hello = Hello(node="n1", service="orders", address="127.0.0.1:1")
    return SidecarSession(ws, request, hello, FakeCert(), StreamLimits(**limits)), request  # type: ignore[arg-type]


async def test_only_the_latest_unsent_snapshot_is_kept() -> None:
    ws = FakeWs()
    s, _ = session(ws)
    for i in range(1, 6):
        s.offer_snapshot(Built(f"{i}.d{i}", f"snap{i}", ()))
    writer = asyncio.create_task(s.run_writer())
    async with asyncio.timeout(2):
        await ws.sent_event.wait()
    writer.cancel()
    assert ws.sent == ["snap5"] and s.sent_version == "5.d5"


async def test_a_stuck_sidecar_is_closed_and_does_not_hold_up_another() -> None:
    stuck_ws, ok_ws = FakeWs(stuck=True), FakeWs()
    stuck, stuck_request = session(stuck_ws, send_timeout=0.2)
    ok, _ = session(ok_ws, send_timeout=0.2)
    writers = [asyncio.create_task(stuck.run_writer()), asyncio.create_task(ok.run_writer())]
    for target in (stuck, ok):  # what Pusher.push_all does: offer, never await
        target.offer_snapshot(Built("1.a", "snap1", ()))
    async with asyncio.timeout(2):
        await ok_ws.sent_event.wait()
    assert ok_ws.sent == ["snap1"]
    async with asyncio.timeout(2):
        await writers[0]
    assert stuck.closed_reason is not None and "cannot keep up" in stuck.closed_reason
    assert stuck_request.transport.aborted
    writers[1].cancel()


async def test_an_overflowing_outbox_closes_the_stream() -> None:
    s, request = session(FakeWs(stuck=True), max_outbox=2)
    for _ in range(3):
        s.offer(Renew())
    assert s.closed_reason is not None and "outbox full" in s.closed_reason
    assert request.transport.aborted


async def test_same_content_under_a_newer_version_is_not_resent() -> None:
    ws = FakeWs()
    s, _ = session(ws)
    s.acked_version = "1.abc"
    s.offer_snapshot(Built("2.abc", "snap", ()))
    assert s.latest_version == "1.abc" and s.status()["state"] == "acked"
    s.offer_snapshot(Built("3.def", "snap3", ()))
    assert s.latest_version == "3.def" and s.status()["state"] == "pending"
