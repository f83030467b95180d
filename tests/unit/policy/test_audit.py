"""The audit log: one JSON record per decision, drops counted (and warned about once per
interval) when the sink blocks, file rotation, and no credentials in records."""

from __future__ import annotations

import hashlib
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from sidecar.audit import AuditLog, RotatingFileSink, StreamSink, build_audit_log
from sidecar.config.api_keys import ApiKey
from sidecar.config.audit import AuditConfig
from sidecar.config.policy import ServiceAuthn
from sidecar.config.rbac import RbacMatch, RbacPolicy, RbacRule
from sidecar.filters.authn_api_key import build_api_key_authn
from sidecar.filters.authz_rbac import build_rbac

from .conftest import FakeClock, exchange, request


class ListSink:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.closed = False

    def write(self, lines: list[str]) -> None:
        self.lines.extend(lines)

    def close(self) -> None:
        self.closed = True


class BlockedSink(ListSink):
    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def write(self, lines: list[str]) -> None:
        self.entered.set()
        self.release.wait(10)
        super().write(lines)


async def test_one_record_per_decision_through_the_filters() -> None:
    sink = ListSink()
    audit = AuditLog(sink, wall=lambda: 1_800_000_000.25)
    await audit.start()
    key = ApiKey("ci", hashlib.sha256(b"the real key").digest(), "ci-bot")
    authn = build_api_key_authn(ServiceAuthn(api_keys=("ci",)), {"ci": key}, audit=audit)
    rbac = build_rbac(RbacPolicy(rules=(RbacRule("reads", "allow",
                                                 RbacMatch(methods=frozenset({"GET"}))),)),
                      service="orders", trust_domain="pake.local", audit=audit)
    denied = exchange(request(headers=[(b"x-api-key", b"secret-key-value")]), request_id="r1")
    assert authn.on_request(denied).status == 401
    allowed = exchange(request("GET", "/orders/1"), peer="spiffe://pake.local/service/web",
                       request_id="r2")
    assert rbac.on_request(allowed) is None
    refused = exchange(request("POST", "/orders/1"), request_id="r3")
    assert rbac.on_request(refused).status == 403
    await audit.stop()
    records = [json.loads(line) for line in sink.lines]
    assert [(r["request_id"], r["stage"], r["decision"], r["rule"]) for r in records] == [
        ("r1", "authn", "deny", "authn_api_key"),
        ("r2", "authz", "allow", "reads"),
        ("r3", "authz", "deny", "default")]
    assert records[1] == {
        "event": "audit", "time": "2027-01-15T08:00:00.250Z", "request_id": "r2", "trace_id": "trace-1",
        "source": "spiffe://pake.local/service/web", "client": "203.0.113.7",
        "principal": "spiffe://pake.local/service/web", "service": "orders",
        "method": "GET", "path": "/orders/1", "stage": "authz", "decision": "allow",
        "rule": "reads", "reason": "rule 'reads' allows GET /orders/1 from "
                                   "spiffe://pake.local/service/web"}
    assert "secret-key-value" not in "".join(sink.lines)
    assert (audit.written, audit.dropped) == (3, 0) and sink.closed


async def test_blocked_sink_drops_are_counted_and_warned_once_per_interval() -> None:
    sink = BlockedSink()
    clock = FakeClock()
    audit = AuditLog(sink, queue_size=4, warn_interval=10.0, clock=clock)
    await audit.start()
    with capture_logs() as logs:
        audit.record(exchange(), "authn", "allow", "r", "first")
        assert sink.entered.wait(5)  # the writer holds record 1 and is stuck in write()
        for i in range(20):
            audit.record(exchange(request_id=f"n{i}"), "authz", "deny", "default", "x")
        clock.advance(10)
        audit.record(exchange(), "authz", "deny", "default", "x")
    assert audit.dropped == 17  # 4 queued, the rest counted
    warnings = [e for e in logs if e["event"] == "audit_records_dropped"]
    assert [w["dropped"] for w in warnings] == [1, 17]  # at most one per interval
    sink.release.set()
    await audit.stop()
    assert audit.written == 5 and len(sink.lines) == 5


async def test_record_never_blocks_even_when_not_started() -> None:
    audit = AuditLog(ListSink(), queue_size=2)
    for _ in range(5):
        audit.record(exchange(), "authn", "allow", "r", "x")
    assert audit.dropped == 3
    await audit.stop()  # never started: nothing to do


def test_rotating_file_sink(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "audit.log"
    sink = RotatingFileSink(path, max_size=100, keep=2)
    for i in range(7):
        sink.write([json.dumps({"n": i, "pad": "x" * 30}) + "\n"])  # ~45 bytes each
    sink.close()
    files = sorted(p.name for p in path.parent.iterdir())
    assert files == ["audit.log", "audit.log.1", "audit.log.2"]
    newest = [json.loads(line)["n"] for line in path.read_text().splitlines()]
    assert newest == [6]
    assert [json.loads(x)["n"] for x in (path.parent / "audit.log.1").read_text().splitlines()] \
        == [4, 5]
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_rotation_keep_zero_truncates(tmp_path: Path) -> None:
    sink = RotatingFileSink(tmp_path / "a.log", max_size=10, keep=0)
    sink.write(["0123456789\n", "abc\n"])
    sink.close()
    assert [p.name for p in tmp_path.iterdir()] == ["a.log"]
    assert (tmp_path / "a.log").read_text() == "abc\n"


async def test_build_audit_log(tmp_path: Path) -> None:
    audit = build_audit_log(AuditConfig(path="logs/audit.log"), base_dir=tmp_path)
    await audit.start()
    audit.record(exchange(), "authn", "allow", "r", "x")
    await audit.stop()
    assert json.loads((tmp_path / "logs/audit.log").read_text())["decision"] == "allow"
    assert isinstance(build_audit_log(AuditConfig()).sink, StreamSink)


async def test_sink_errors_are_counted_not_fatal() -> None:
    class Broken(ListSink):
        def write(self, lines: list[str]) -> None:
            raise OSError(28, "No space left on device")

    audit = AuditLog(Broken(), clock=FakeClock())
    await audit.start()
    with capture_logs() as logs:
        audit.record(exchange(), "authn", "allow", "r", "x")
        await audit.stop()
    assert audit.write_errors == 1
    assert any(e["event"] == "audit_write_failed" for e in logs)


def test_stream_sink_writes_lines() -> None:
    stream = io.StringIO()
    StreamSink(stream).write(['{"a":1}\n'])
    assert stream.getvalue() == '{"a":1}\n'


@pytest.fixture(autouse=True)
def _no_thread_leak() -> Iterator[None]:
    before = {t.name for t in threading.enumerate()}
    yield
    assert "audit-writer" not in {t.name for t in threading.enumerate()} - before
