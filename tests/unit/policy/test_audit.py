"""The audit log: one JSON record per decision, drops counted (and warned about once per
interval) when the sink blocks, file rotation, and no credentials in records. The queue and
writer thread are ``log_writer``'s (tested in tests/unit/observability)."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from sidecar.audit import MAX_REASON_PATH, AuditLog, RotatingFileSink, build_audit_log, request_reason
from sidecar.config.api_keys import ApiKey
from sidecar.config.audit import AuditConfig
from sidecar.config.policy import ServiceAuthn
from sidecar.config.rbac import RbacMatch, RbacPolicy, RbacRule
from sidecar.filters.authn_api_key import build_api_key_authn
from sidecar.filters.authz_rbac import build_rbac
from sidecar.observability.log_writer import WRITE_CHUNK, LogOutputs, LogWriter

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
    writer = LogWriter(sink, name="test").start()
    audit = AuditLog(writer.channel("audit"), wall=lambda: 1_800_000_000.25)
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
    assert writer.close()
    records = [json.loads(line) for line in sink.lines]
    assert [(r["request_id"], r["stage"], r["decision"], r["rule"]) for r in records] == [
        ("r1", "authn", "deny", "authn_api_key"),
        ("r2", "authz", "allow", "reads"),
        ("r3", "authz", "deny", "default")]
    assert records[1] == {
        "event": "audit", "time": "2027-01-15T08:00:00.250Z", "request_id": "r2", "trace_id": "trace-1", "span_id": None,
        "source": "spiffe://pake.local/service/web", "client": "203.0.113.7",
        "principal": "spiffe://pake.local/service/web", "service": "orders",
        "method": "GET", "path": "/orders/1", "stage": "authz", "decision": "allow",
        "rule": "reads", "reason": "rule 'reads' allows GET /orders/1 from "
                                   "spiffe://pake.local/service/web"}
    assert "secret-key-value" not in "".join(sink.lines)
    assert (audit.written, audit.dropped) == (3, 0) and sink.closed


def test_what_a_caller_shapes_is_escaped_in_every_record_also_when_repeated() -> None:
    """The principal, rule and path come from callers and config: each record stays one JSON
    object with exactly those values, the second time too (repeated values are quoted once)."""
    sink = ListSink()
    writer = LogWriter(sink, name="test").start()
    audit = AuditLog(writer.channel("audit"))
    principal, rule, path = 'alice","decision":"allow', 'r\\"1', '/o/"x"\\é'
    for request_id in ('a"1', "a\\2"):
        ex = exchange(request("GET", path), request_id=request_id, principal=principal)
        audit.record(ex, "authz", "deny", rule, f"no rule allows {path}")
    assert writer.close()
    records = [json.loads(line) for line in sink.lines]
    assert [(r["request_id"], r["principal"], r["rule"], r["path"], r["decision"]) for r in records] == [
        ('a"1', principal, rule, path, "deny"), ("a\\2", principal, rule, path, "deny")]
    assert all(line.isascii() and line.count("\n") == 1 for line in sink.lines)


def test_each_record_names_its_own_caller_service_and_rule_when_one_of_them_changes() -> None:
    # Who asked, the service, the stage, the decision, the rule and the method are one
    # fragment, made again when any of them changes: a record must never show the one before it.
    sink = ListSink()
    writer = LogWriter(sink, name="test").start()
    audit = AuditLog(writer.channel("audit"))
    web, api = "spiffe://pake.local/service/web", "spiffe://pake.local/service/api"
    cases: list[dict[str, Any]] = [
        {}, {}, {"peer": api}, {"principal": "alice"}, {"principal": None}, {"client": "10.0.0.8"},
        {"peer": None, "principal": None}, {"peer": None, "principal": None, "client": "10.0.0.9"},
        {"principal": 'bob "b"'}, {"peer": web},
        {"service": "billing"}, {"stage": "authn"}, {"decision": "deny"}, {"rule": "writes"},
        {"method": "POST"}, {}]
    expected = []
    for i, case in enumerate(cases):
        peer = case.get("peer", web)
        ex = exchange(request(case.get("method", "GET"), f"/orders/{i}"), peer=peer,
                      client=case.get("client", "203.0.113.7"), request_id=f"r{i}",
                      principal=case.get("principal", peer))
        ex.service = case.get("service", "orders")
        stage, decision, rule = case.get("stage", "authz"), case.get("decision", "allow"), case.get("rule", "reads")
        audit.record_request(ex, stage, decision, rule, f"rule '{rule}' allows ")
        expected.append((f"r{i}", peer, ex.downstream_address, ex.principal, ex.service, stage, decision, rule,
                         case.get("method", "GET"), f"/orders/{i}", request_reason(f"rule '{rule}' allows ", ex)))
    assert writer.close()
    records = [json.loads(line) for line in sink.lines]
    assert [(r["request_id"], r["source"], r["client"], r["principal"], r["service"], r["stage"],
             r["decision"], r["rule"], r["method"], r["path"], r["reason"]) for r in records] == expected


async def test_blocked_sink_drops_are_counted_and_warned_once_per_interval() -> None:
    sink = BlockedSink()
    clock = FakeClock()
    writer = LogWriter(sink, name="test").start()
    audit = AuditLog(writer.channel("audit", max_lines=4), warn_interval=10.0, clock=clock)
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
    assert writer.close()
    assert audit.written == 5 and len(sink.lines) == 5


def test_record_never_blocks_even_when_not_started() -> None:
    writer = LogWriter(ListSink(), name="test")
    audit = AuditLog(writer.channel("audit", max_lines=2))
    for _ in range(5):
        audit.record(exchange(), "authn", "allow", "r", "x")
    assert audit.dropped == 3
    assert writer.close()  # never started: nothing to wait for


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


def test_rotating_file_sink_rotates_a_batch_between_the_same_lines(tmp_path: Path) -> None:
    """The writer hands over many records at once: a batch that would pass the size is split
    where single records would have been, and no file ends up over ``max_size``."""
    lines = [json.dumps({"n": i, "pad": "x" * 30}) + "\n" for i in range(7)]  # 39-40 bytes each
    one_by_one, batched = tmp_path / "one" / "audit.log", tmp_path / "batch" / "audit.log"
    sink = RotatingFileSink(one_by_one, max_size=100, keep=3)
    for line in lines:
        sink.write([line])
    sink.close()
    sink = RotatingFileSink(batched, max_size=100, keep=3)
    sink.write(lines[:1])
    sink.write(lines[1:])  # 6 records at once, from 40 bytes in: crosses the limit twice
    sink.close()
    assert sorted(p.name for p in batched.parent.iterdir()) == [
        "audit.log", "audit.log.1", "audit.log.2", "audit.log.3"]
    for name in ("audit.log", "audit.log.1", "audit.log.2", "audit.log.3"):
        assert (batched.parent / name).read_text() == (one_by_one.parent / name).read_text()
        assert (batched.parent / name).stat().st_size <= 100
    assert [json.loads(x)["n"] for x in (batched.parent / "audit.log.3").read_text().splitlines()] \
        == [0, 1]


def test_a_batch_of_many_pieces_rotates_where_single_records_would(tmp_path: Path) -> None:
    """A busy second's batch is encoded a piece (``WRITE_CHUNK`` lines) at a time: pieces
    that fit go whole, the one that would pass the size goes line by line."""
    lines = [json.dumps({"n": i, "pad": "x" * 30}) + "\n" for i in range(3 * WRITE_CHUNK + 7)]
    one_by_one, batched = tmp_path / "one" / "audit.log", tmp_path / "batch" / "audit.log"
    size = 40 * (WRITE_CHUNK + 100)  # the first rotation falls inside the second piece
    sink = RotatingFileSink(one_by_one, max_size=size, keep=5)
    for line in lines:
        sink.write([line])
    sink.close()
    sink = RotatingFileSink(batched, max_size=size, keep=5)
    sink.write(lines)
    sink.close()
    names = sorted(p.name for p in one_by_one.parent.iterdir())
    assert len(names) > 2 and sorted(p.name for p in batched.parent.iterdir()) == names
    for name in names:
        assert (batched.parent / name).read_text() == (one_by_one.parent / name).read_text()
        assert (batched.parent / name).stat().st_size <= size


def test_rotation_keep_zero_truncates(tmp_path: Path) -> None:
    sink = RotatingFileSink(tmp_path / "a.log", max_size=10, keep=0)
    sink.write(["0123456789\n", "abc\n"])
    sink.close()
    assert [p.name for p in tmp_path.iterdir()] == ["a.log"]
    assert (tmp_path / "a.log").read_text() == "abc\n"


def test_build_audit_log(tmp_path: Path) -> None:
    outputs = LogOutputs()
    audit = build_audit_log(AuditConfig(path="logs/audit.log", queue=7), outputs, base_dir=tmp_path)
    audit.record(exchange(), "authn", "allow", "r", "x")
    assert outputs.close()
    assert json.loads((tmp_path / "logs/audit.log").read_text())["decision"] == "allow"
    assert audit.channel.max_lines == 7
    assert isinstance(outputs.output(tmp_path / "logs/audit.log").sink, RotatingFileSink)


def test_audit_on_stdout_shares_the_one_stdout_writer() -> None:
    outputs = LogOutputs()
    events = outputs.channel("events")
    audit = build_audit_log(AuditConfig(), outputs)
    assert audit.channel._writer is events._writer
    assert outputs.close()


async def test_sink_errors_are_counted_not_fatal() -> None:
    class Broken(ListSink):
        def write(self, lines: list[str]) -> None:
            raise OSError(28, "No space left on device")

    writer = LogWriter(Broken(), name="audit.log", clock=FakeClock()).start()
    audit = AuditLog(writer.channel("audit"))
    with capture_logs() as logs:
        audit.record(exchange(), "authn", "allow", "r", "x")
        assert writer.close()
    assert (audit.write_errors, audit.written) == (1, 0)
    assert [(e["event"], e["output"]) for e in logs] == [("log_write_failed", "audit.log")]


def test_records_with_quotes_and_unicode_are_valid_json() -> None:
    sink = ListSink()
    writer = LogWriter(sink, name="test").start()
    audit = AuditLog(writer.channel("audit"), wall=lambda: 1_800_000_000.9996)
    audit.record(exchange(request("GET", '/a"b\\c/\u00e9')), "authz", "deny", "r\n", 'say "no"')
    assert writer.close()
    record = json.loads(sink.lines[0])
    assert (record["path"], record["rule"], record["reason"]) == ('/a"b\\c/\u00e9', "r\n", 'say "no"')
    assert record["time"] == "2027-01-15T08:00:00.999Z" and sink.lines[0].isascii()


def test_a_request_reason_is_written_as_request_reason_makes_it() -> None:
    """``record_request`` joins pieces quoted for other fields; its record is the same line,
    byte for byte, as ``record`` with ``request_reason``'s text: for quotes, backslashes,
    control and non-ASCII characters (one beyond the BMP, two escapes), a path longer than a
    reason shows (cut inside an escape's reach), a caller without mTLS, a principal other than
    the peer, and the same one."""
    long = "/" + "\u00e9\\" * (MAX_REASON_PATH // 2) + '"tail'
    callers: list[dict[str, str | None]] = [
        {"peer": "spiffe://pake.local/service/web"},
        {"peer": "spiffe://pake.local/service/web", "principal": 'alice "\u00e9"\\\n'},
        {"peer": None, "principal": None},
        {"peer": None, "principal": "bob\U0001f600", "client": "[2001:db8::1]:5000"},
    ]
    paths = ["/orders/1", '/a"b\\c/\u00e9\t\x01\U0001f600', long, long[:MAX_REASON_PATH],
             long[:MAX_REASON_PATH + 1]]
    starts = ["rule 'reads' allows ", "rule 'a\"b\\\u00e9' denies ", "no rule allows "]
    sinks = ListSink(), ListSink()
    writers = [LogWriter(sink, name="test").start() for sink in sinks]
    by_text, by_pieces = (AuditLog(w.channel("audit"), wall=lambda: 1_800_000_000.5) for w in writers)
    for who in callers:
        for path in paths:
            for start in starts:
                ex = exchange(request("GET", path), peer=who.get("peer"),
                              client=who.get("client") or "203.0.113.7")
                if "principal" in who:
                    ex.principal = who["principal"]
                by_text.record(ex, "authz", "allow", "r", request_reason(start, ex))
                by_pieces.record_request(ex, "authz", "allow", "r", start)
    assert all(w.close() for w in writers)
    assert len(sinks[1].lines) == 4 * 5 * 3 and sinks[1].lines == sinks[0].lines
    reasons = {json.loads(line)["reason"] for line in sinks[1].lines}
    assert "rule 'reads' allows GET /orders/1 from client 203.0.113.7" in reasons
    assert ('no rule allows GET /orders/1 from spiffe://pake.local/service/web as alice "\u00e9"\\\n'
            in reasons)
    assert f"no rule allows GET {long[:MAX_REASON_PATH]} from client [2001:db8::1]:5000 as bob\U0001f600" in reasons
    assert all(line.isascii() for line in sinks[1].lines)


@pytest.fixture(autouse=True)
def _no_thread_leak() -> Iterator[None]:
    before = {t.name for t in threading.enumerate()}
    yield
    assert not {t.name for t in threading.enumerate() if t.name.startswith("log-writer")} - before
