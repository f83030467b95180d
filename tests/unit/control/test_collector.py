"""The trace store's bounds and the OTLP decoding, without sockets."""

from __future__ import annotations

from typing import Any

import pytest

from control.collector import BadExport, CollectorLimits, TraceStore, decode_export, spans_of


def span(trace: str, span_id: str, parent: str | None = None, size: int = 100,
         start: float = 1.0) -> dict[str, Any]:
    return {"trace_id": trace, "span_id": span_id, "parent_span_id": parent, "name": span_id,
            "kind": "SERVER", "service": "s", "start_time": start, "duration_ms": 1.0,
            "attributes": {}, "status": {"code": "UNSET", "message": ""}, "events": [], "size": size}


def test_the_least_recently_updated_trace_goes_first() -> None:
    store = TraceStore(CollectorLimits(max_traces=2, max_bytes=10_000))
    store.add([span("a", "1")])
    store.add([span("b", "1")])
    store.add([span("a", "2", parent="1")])  # a is now the most recent
    store.add([span("c", "1")])
    assert [t["trace_id"] for t in store.summaries()] == ["c", "a"]
    assert store.traces_evicted == 1


def test_bytes_and_spans_per_trace_are_bounded() -> None:
    store = TraceStore(CollectorLimits(max_traces=100, max_bytes=250, max_spans_per_trace=2))
    store.add([span("a", "1"), span("a", "2"), span("a", "3")])
    assert store.spans_dropped == 1 and store.size == 200
    store.add([span("b", "1")])  # 300 bytes > 250: a goes
    assert [t["trace_id"] for t in store.summaries()] == ["b"] and store.size == 100


def test_a_trace_has_links_and_depths() -> None:
    store = TraceStore()
    store.add([span("t", "c", parent="r", start=2.0), span("r", "x"), span("t", "r", start=1.0),
               span("t", "g", parent="c", start=3.0)])
    trace = store.get("t")
    assert trace is not None
    assert [(s["span_id"], s["depth"], s["children"]) for s in trace["spans"]] == [
        ("r", 0, ["c"]), ("c", 1, ["g"]), ("g", 2, [])]
    assert trace["root"] == "r"


def test_json_ids_are_hex_and_bad_ones_are_named() -> None:
    body = (b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"5b8efff798038103d269b633813fc60c",'
            b'"spanId":"eee19b7ec3c1b174","parentSpanId":"","name":"x","kind":"SPAN_KIND_CLIENT"}]}]}]}')
    [s] = spans_of(decode_export(body, "application/json"))
    assert (s["trace_id"], s["span_id"], s["parent_span_id"], s["kind"]) == (
        "5b8efff798038103d269b633813fc60c", "eee19b7ec3c1b174", None, "CLIENT")
    with pytest.raises(BadExport, match="trace_id must be 16 bytes"):
        spans_of(decode_export(b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"abcd",'
                               b'"spanId":"eee19b7ec3c1b174"}]}]}]}', "application/json"))
    with pytest.raises(BadExport, match="not JSON"):
        decode_export(b"{", "application/json")
