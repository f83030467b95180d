"""The access line's fields (from a template, not a dict) and the structlog events: both go
on a log channel as whole JSON lines, never straight to an output."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from sidecar.config.model import RouteConfig, RouteMatch
from sidecar.exchange import Exchange
from sidecar.http.message import RequestHead
from sidecar.observability.access_log import AccessLog
from sidecar.observability.log_writer import LogWriter
from sidecar.observability.logging import configure_logging, log_control


class ListSink:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, lines: list[str]) -> None:
        self.lines.extend(lines)

    def close(self) -> None:
        pass


def exchange(path: str = "/orders/1", **kw: Any) -> Exchange:
    head = RequestHead(method="GET", target=path.encode(), path=path, authority="orders:8080",
                       host="orders", version="1.1", headers=[])
    return Exchange(request=head, listener="inbound", downstream_address="10.0.0.7", request_id="r-1",
                    start=0.0, **kw)


def test_access_line_has_every_field_and_only_the_optional_ones_set() -> None:
    sink = ListSink()
    writer = LogWriter(sink, name="test").start()
    access = AccessLog(writer.channel("access"))
    full = exchange('/o/"quoted"\\é', peer_identity="spiffe://pake.local/service/web",
                    principal="alice", reason='rule "x"', cluster="orders", upstream="127.0.0.1:8080",
                    attempts=2, status=403, flags="RBAC", bytes_in=12, bytes_out=345,
                    trace_id="4bf92f3577b34da6a3ce929d0e0e4736", span_id="00f067aa0ba902b7")
    full.route = RouteConfig(name="reads", match=RouteMatch(), to=())
    full.tags.update(rbac="deny", rbac_rule="x")
    access.log(full, 0.0012345)
    access.log(exchange(), 0.5)
    assert writer.close()
    first, second = (json.loads(line) for line in sink.lines)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", first.pop("timestamp"))
    assert first == {
        "event": "access", "listener": "inbound", "method": "GET", "authority": "orders:8080",
        "path": '/o/"quoted"\\é', "status": 403, "bytes_in": 12, "bytes_out": 345, "duration_ms": 1.234,
        "route": "reads", "cluster": "orders", "upstream": "127.0.0.1:8080", "attempts": 2,
        "flags": "RBAC", "request_id": "r-1", "client": "10.0.0.7",
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "span_id": "00f067aa0ba902b7",
        "peer": "spiffe://pake.local/service/web", "principal": "alice", "reason": 'rule "x"',
        "rbac": "deny", "rbac_rule": "x"}
    assert (second["route"], second["duration_ms"]) == ("-", 500.0)
    assert (second["trace_id"], second["span_id"]) == (None, None)  # tracing off: null, present
    assert not {"peer", "principal", "reason"} & second.keys()
    assert all(line.endswith("}\n") and line.isascii() for line in sink.lines)


def test_each_line_names_its_own_caller_and_upstream_when_one_of_them_changes() -> None:
    # The fields that repeat from line to line (listener, authority, route, cluster, upstream,
    # client, peer, principal) are one fragment, made again when any of them changes: a
    # line must never show the exchange before it.
    sink = ListSink()
    writer = LogWriter(sink, name="test").start()
    access = AccessLog(writer.channel("access"))
    reads = RouteConfig(name="reads", match=RouteMatch(), to=())
    base = {"cluster": "orders", "upstream": "127.0.0.1:8080"}
    changes: list[dict[str, Any]] = [
        {}, {}, {"upstream": "127.0.0.1:8081"}, {"cluster": "billing"}, {"peer_identity": "spiffe://a"},
        {"peer_identity": "spiffe://b"}, {"principal": "alice"}, {"principal": "bob"}, {}, {"route": reads},
        {"listener": "outbound"}, {"downstream_address": "10.0.0.8"}, {"authority": "orders:9090"}, {}]
    expected = []
    for change in changes:
        ex = exchange(**{**base, **{k: v for k, v in change.items()
                                    if k not in ("route", "listener", "downstream_address", "authority")}})
        ex.route = change.get("route")
        ex.listener = change.get("listener", ex.listener)
        ex.downstream_address = change.get("downstream_address", ex.downstream_address)
        ex.request.authority = change.get("authority", ex.request.authority)
        access.log(ex, 0.001)
        expected.append((ex.listener, ex.request.authority, ex.route.name if ex.route else "-", ex.cluster,
                         ex.upstream, ex.downstream_address, ex.peer_identity, ex.principal))
    assert writer.close()
    lines = [json.loads(line) for line in sink.lines]
    assert [(line["listener"], line["authority"], line["route"], line["cluster"], line["upstream"],
             line["client"], line.get("peer"), line.get("principal")) for line in lines] == expected


def test_each_line_shows_its_own_method_and_flags_when_they_change() -> None:
    # the line's opening with the method, and the flags with the keys around them, are kept
    # from the line before while they stay the same object
    sink = ListSink()
    writer = LogWriter(sink, name="test").start()
    access = AccessLog(writer.channel("access"))
    cases = [("GET", "-"), ("GET", "-"), ("POST", "-"), ("POST", "UO"), ("GET", "UO"), ("GET", "-"),
             ("PURGE", "RBAC"), ("GET", "-")]
    for method, flags in cases:
        ex = exchange(flags=flags)
        ex.request.method = method
        access.log(ex, 0.001)
    assert writer.close()
    assert [(line["method"], line["flags"], line["request_id"]) for line in map(json.loads, sink.lines)] == [
        (method, flags, "r-1") for method, flags in cases]


def test_each_line_carries_its_own_tags_when_they_change() -> None:
    # The last tags' fragment is kept while the next exchange's tags are the same: a line
    # must show exactly its exchange's tags (and its reason), never the one before.
    sink = ListSink()
    writer = LogWriter(sink, name="test").start()
    access = AccessLog(writer.channel("access"))
    cases: list[tuple[dict[str, str], str]] = [
        ({"rbac": "allow", "rbac_rule": "reads"}, ""), ({"rbac": "allow", "rbac_rule": "reads"}, ""),
        ({"rbac": "deny", "rbac_rule": "reads"}, 'no rule "x"'), ({"rbac": "deny", "rbac_rule": "writes"}, ""),
        ({}, ""), ({}, "why"), ({"rbac": "deny", "rbac_rule": "writes", "authn": "jwt"}, ""),
        ({"rbac": "deny", "rbac_rule": "writes"}, ""), ({"rbac": "deny", "rbac_rule": "writes"}, "")]
    for tags, reason in cases:
        ex = exchange(reason=reason)
        ex.tags.update(tags)
        access.log(ex, 0.001)
    assert writer.close()
    lines = [json.loads(line) for line in sink.lines]
    keys = {"rbac", "rbac_rule", "authn", "reason"}
    assert [{k: v for k, v in line.items() if k in keys} for line in lines] == [
        {**tags, **({"reason": reason} if reason else {})} for tags, reason in cases]


def test_a_request_id_holding_a_quote_or_a_backslash_keeps_the_line_valid_json() -> None:
    sink = ListSink()
    writer = LogWriter(sink, name="test").start()
    access = AccessLog(writer.channel("access"))
    hostile = exchange()
    hostile.request_id = 'id"},"status":200,"x":"\\'  # printable: a caller's id the listener keeps
    access.log(hostile, 0.001)
    assert writer.close()
    line = json.loads(sink.lines[0])
    assert (line["request_id"], line["status"]) == (hostile.request_id, 0) and "x" not in line


def test_the_timestamp_follows_the_wall_clock_read_once_a_second() -> None:
    """The wall clock is read when the second of the last stamp is over by the monotonic
    clock, so a step of the wall clock (NTP, a VM resumed) shows from the next second on."""
    sink = ListSink()
    writer = LogWriter(sink, name="test").start()
    walls = iter([1_700_000_000.75, 1_700_000_001.25, 1_800_000_000.0])
    reads: list[float] = []

    def wall() -> float:
        reads.append(next(walls))
        return reads[-1]

    access = AccessLog(writer.channel("access"), wall=wall)
    for end in (10.0, 10.2, 10.24, 10.26, 10.5, 11.3):  # monotonic ends: 10.0 is at wall .75
        ex = exchange()
        ex.start = end - 0.001
        access.log(ex, 0.001)
    assert writer.close()
    stamps = [json.loads(line)["timestamp"] for line in sink.lines]
    assert stamps == ["2023-11-14T22:13:20Z"] * 3 + ["2023-11-14T22:13:21Z"] * 2 + ["2027-01-15T08:00:00Z"]
    assert len(reads) == 3  # once per second, not once per line


@pytest.fixture
def _restore_structlog() -> Iterator[None]:
    saved = structlog.get_config()
    yield
    if (running := log_control()) is not None:
        running.close()  # the stdlib root handler and levels configure_logging set
    structlog.configure(**saved)


@pytest.mark.usefixtures("_restore_structlog")
def test_structlog_events_go_on_the_events_channel_and_are_dropped_when_full() -> None:
    sink = ListSink()
    writer = LogWriter(sink, name="stdout")  # not started: an output that takes nothing
    events = writer.channel("events", max_lines=2)
    configure_logging(events, "info")
    log = structlog.get_logger("test")
    log.debug("hidden")  # below the level: never rendered
    log.info("ready", ports={"admin": 1})
    log.error("reload_rejected", problems=["mesh.yaml: services: must be a mapping"])
    log.warning("refused", status=400)  # the queue holds 2: counted, not waited for
    assert (events.pending, events.dropped) == (2, 1)
    writer.start()
    assert writer.close()
    lines = [json.loads(line) for line in sink.lines]
    assert [(e["event"], e["level"]) for e in lines] == [("ready", "info"), ("reload_rejected", "error")]


def test_shared_tags_show_on_each_line_as_that_exchange_has_them() -> None:
    """A rule's decision tags its exchanges with one shared dict, which the log knows by
    identity; an exchange that adds a fact has its own copy, and shows it, the next one
    sharing the dict again does not."""
    sink = ListSink()
    writer = LogWriter(sink, name="test").start()
    access = AccessLog(writer.channel("access"))
    allow = {"rbac_rule": "reads", "rbac": "allow"}
    deny = {"rbac_rule": "reads", "rbac": "deny"}
    steps: list[tuple[dict[str, str], dict[str, str]]] = [(allow, {}), (allow, {"filter": "authz_rbac"}),
                                                          (allow, {}), (deny, {}), (allow, {})]
    for shared, more in steps:
        ex = exchange()
        ex.share_tags(shared)
        for key, value in more.items():
            ex.tag(key, value)
        access.log(ex, 0.001)
    assert writer.close()
    lines = [json.loads(line) for line in sink.lines]
    keys = {"rbac", "rbac_rule", "filter"}
    assert [{k: v for k, v in line.items() if k in keys} for line in lines] == [
        {**shared, **more} for shared, more in steps]
    assert allow == {"rbac_rule": "reads", "rbac": "allow"}, "the shared dict is never changed"
