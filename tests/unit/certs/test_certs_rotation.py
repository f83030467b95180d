"""renew_at, and FileWatcher noticing replaced files on a real event loop."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from certs.rotation import FileWatcher, renew_at, stamp
from certs.ssl_context import TlsContextSource
from tests.helpers.pki import MeshPki

TICK = 0.01
WAIT = 5.0


def test_renew_at_two_thirds() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    assert renew_at(start, start + timedelta(hours=24)) == start + timedelta(hours=16)
    assert renew_at(start, start + timedelta(seconds=90)) == start + timedelta(seconds=60)
    with pytest.raises(ValueError):
        renew_at(start, start)


def test_stamp_of_missing_file(tmp_path: Path) -> None:
    assert stamp(tmp_path / "nope") is None


class Recorder:
    """Collects callbacks and lets a test wait for the next one."""

    def __init__(self) -> None:
        self.changes: list[dict[str, Any]] = []
        self.errors: list[Exception] = []
        self.changed = asyncio.Event()
        self.failed = asyncio.Event()

    def on_change(self, info: dict[str, Any]) -> None:
        self.changes.append(info)
        self.changed.set()

    async def on_error(self, exc: Exception) -> None:  # async callbacks are awaited
        self.errors.append(exc)
        self.failed.set()

    async def error_containing(self, text: str) -> Exception:
        """Wait for an error whose message contains text (others may come first:
        a poll can catch a file mid-write)."""
        async with asyncio.timeout(WAIT):
            while True:
                for exc in self.errors:
                    if text in str(exc):
                        return exc
                self.failed.clear()
                await self.failed.wait()


async def test_first_poll_is_a_no_op_when_files_are_loaded(pki: MeshPki) -> None:
    source = TlsContextSource(pki.services["orders"])
    watcher = FileWatcher(source, interval=TICK)
    server = source.server()
    assert await watcher.poll() is False
    assert await watcher.poll() is False
    assert source.server() is server and watcher.reloads == 0


async def test_watcher_notices_replaced_certificate(pki: MeshPki) -> None:
    source = TlsContextSource(pki.services["orders"])
    old_serial = source.info()["serial"]
    rec = Recorder()
    watcher = FileWatcher(source, rec.on_change, interval=TICK, on_error=rec.on_error)
    watcher.start()
    try:
        await watcher.poll()  # settle: the files as loaded are now "applied"
        pki.issue("orders")
        await asyncio.wait_for(rec.changed.wait(), WAIT)
    finally:
        await watcher.stop()
    assert len(rec.changes) == 1
    assert rec.changes[0]["serial"] != old_serial
    assert rec.changes[0]["serial"] == source.info()["serial"]
    assert "PRIVATE" not in repr(rec.changes[0])
    # issue() replaces bundle, key, cert one by one: a poll in between may see
    # a key/cert mismatch, which must only have been reported, never applied.
    assert all("does not match" in str(e) for e in rec.errors)


async def test_watcher_waits_for_key_and_cert_to_match(pki: MeshPki, tmp_path: Path) -> None:
    orders = pki.services["orders"]
    source = TlsContextSource(orders)
    old_server = source.server()
    rec = Recorder()
    watcher = FileWatcher(source, rec.on_change, interval=TICK, on_error=rec.on_error)
    task = watcher.start()
    try:
        renewed = pki.issue("orders", out_dir=tmp_path / "staging")
        orders.key.write_bytes(renewed.key.read_bytes())  # non-atomic: key first
        await rec.error_containing("private key does not match")
        assert source.server() is old_server  # old contexts kept, watcher alive
        assert not task.done()
        orders.cert.write_bytes(renewed.cert.read_bytes())
        await asyncio.wait_for(rec.changed.wait(), WAIT)
    finally:
        await watcher.stop()
    assert source.server() is not old_server
    assert len(rec.changes) == 1
    assert watcher.last_error is None


async def test_a_failure_is_reported_once_and_retried_every_tick(
    pki: MeshPki, tmp_path: Path
) -> None:
    orders = pki.services["orders"]
    source = TlsContextSource(orders)
    rec = Recorder()
    watcher = FileWatcher(source, rec.on_change, interval=TICK, on_error=rec.on_error)
    await watcher.poll()
    renewed = pki.issue("orders", out_dir=tmp_path / "staging")
    orders.key.write_bytes(renewed.key.read_bytes())
    for _ in range(5):
        assert await watcher.poll() is False
    assert len(rec.errors) == 1
    assert "does not match" in str(watcher.last_error)
    orders.cert.write_bytes(renewed.cert.read_bytes())
    assert await watcher.poll() is True
    assert len(rec.changes) == 1


async def test_watcher_survives_a_missing_file_and_recovers(pki: MeshPki) -> None:
    orders = pki.services["orders"]
    source = TlsContextSource(orders)
    rec = Recorder()
    watcher = FileWatcher(source, rec.on_change, interval=TICK, on_error=rec.on_error)
    await watcher.poll()
    saved = orders.cert.read_bytes()
    orders.cert.unlink()
    assert await watcher.poll() is False
    assert "file is missing" in str(watcher.last_error)
    orders.cert.write_bytes(saved)  # same content back: nothing to swap
    assert await watcher.poll() is False
    assert watcher.last_error is None and rec.changes == []


async def test_broken_callback_does_not_stop_the_watcher(pki: MeshPki) -> None:
    source = TlsContextSource(pki.services["orders"])
    errors: list[Exception] = []

    def on_change(info: dict[str, Any]) -> None:
        raise RuntimeError("boom")

    watcher = FileWatcher(source, on_change, interval=TICK, on_error=errors.append)
    await watcher.poll()
    pki.issue("orders")
    assert await watcher.poll() is True
    assert [str(e) for e in errors] == ["boom"]
    pki.issue("orders")
    assert await watcher.poll() is True  # still working
    assert watcher.reloads == 2


async def test_start_stop(pki: MeshPki) -> None:
    watcher = FileWatcher(TlsContextSource(pki.services["orders"]), interval=TICK)
    task = watcher.start()
    with pytest.raises(RuntimeError):
        watcher.start()
    await watcher.stop()
    assert task.cancelled()
    await watcher.stop()  # idempotent


async def test_injected_sleep_controls_the_pace(pki: MeshPki) -> None:
    ticks: list[float] = []
    enough = asyncio.Event()

    async def sleep(seconds: float) -> None:
        ticks.append(seconds)
        if len(ticks) >= 3:
            enough.set()
        await asyncio.sleep(0)

    watcher = FileWatcher(TlsContextSource(pki.services["orders"]), interval=7.5, sleep=sleep)
    watcher.start()
    try:
        await asyncio.wait_for(enough.wait(), WAIT)
    finally:
        await watcher.stop()
    assert ticks[:3] == [7.5, 7.5, 7.5]


def test_interval_must_be_positive(pki: MeshPki) -> None:
    with pytest.raises(ValueError):
        FileWatcher(TlsContextSource(pki.services["orders"]), interval=0)
