"""Trace context parsing, sampling and the span sink, without sockets: exchanges built by hand,
spans caught by an in-memory exporter (or one that blocks, to fill the bounded queue)."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import yaml
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry

from sidecar.config.load import ConfigError, load_bootstrap
from sidecar.config.tracing import TracingConfig
from sidecar.exchange import Exchange
from sidecar.config.model import Limits
from sidecar.http.message import RequestHead
from sidecar.http.headers import RequestIds
from sidecar.http.request_parser import RequestParser
from sidecar.observability.trace_context import TraceStart, parse_traceparent
from sidecar.observability.tracing import Tracer
from sidecar.upstream.endpoint import Outcome

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


class _Heads:
    def __init__(self) -> None:
        self.heads: list[RequestHead] = []

    def on_request(self, head: RequestHead) -> None:
        self.heads.append(head)

    def on_body(self, chunk: bytes) -> None: ...

    def on_request_end(self) -> None: ...


def exchange(listener: str = "inbound", headers: list[tuple[bytes, bytes]] | None = None) -> Exchange:
    """An exchange whose head came through the real request parser (which picks the trace
    context out of the headers for the tracer)."""
    sink = _Heads()
    lines = b"".join(b"%s: %s\r\n" % (name, value) for name, value in headers or [])
    RequestParser(sink, Limits()).feed(b"GET /o/1 HTTP/1.1\r\nhost: orders\r\n" + lines + b"\r\n")
    [head] = sink.heads
    return Exchange(request=head, listener=listener, downstream_address="10.0.0.7", request_id="r-1",
                    start=0.0)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    yield InMemorySpanExporter()


def tracer_for(exporter: SpanExporter, sample: float = 1.0, queue: int = 64) -> Tracer:
    return Tracer(TracingConfig(sample=sample, queue=queue, batch=min(queue, 8), interval=0.01),
                  "orders", registry=CollectorRegistry(), exporter=exporter)


@pytest.mark.parametrize("value, expected", [
    (f"00-{TRACE}-{PARENT}-01".encode(), (TRACE, PARENT, True)),
    (f"00-{TRACE}-{PARENT}-00".encode(), (TRACE, PARENT, False)),
    (f"01-{TRACE}-{PARENT}-03-later-fields".encode(), (TRACE, PARENT, True)),  # a later version
    (f"00-{TRACE}-{PARENT}-01-extra".encode(), None),  # version 00 has exactly four fields
    (f"ff-{TRACE}-{PARENT}-01".encode(), None),
    (f"00-{'0' * 32}-{PARENT}-01".encode(), None),
    (f"00-{TRACE}-{'0' * 16}-01".encode(), None),
    (f"00-{TRACE.upper()}-{PARENT}-01".encode(), None),
    (b"00-not-a-trace-01", None),
    (b"", None),
])
def test_traceparent_is_parsed_strictly(value: bytes, expected: tuple[str, str, bool] | None) -> None:
    assert parse_traceparent(value) == expected


def test_a_caller_trace_is_continued_and_its_traceparent_replaced_per_try(spans: InMemorySpanExporter) -> None:
    tracer = tracer_for(spans, sample=0.0)
    ex = exchange("outbound", [(b"traceparent", f"00-{TRACE}-{PARENT}-01".encode()),
                               (b"tracestate", b"v=1"), (b"accept", b"*/*")])
    tracer.context.start(ex, b"http")
    assert ex.request.headers == [(b"accept", b"*/*"), (b"tracestate", b"v=1")]  # each try sends its own
    trace = ex.trace
    assert trace is not None and ex.trace_id == TRACE and trace.sampled  # the caller's flag wins over 0%
    ex.upstream, ex.cluster = "10.0.0.5:8080", "orders"
    sent = []
    for outcome, status in ((Outcome.GATEWAY_ERROR, 503), (Outcome.SUCCESS, 200)):
        trace.try_start(ex)
        sent.append(trace.header())
        trace.try_response(status)
        trace.try_end(ex, outcome)
    ex.status = 200
    trace.finish(ex)
    assert tracer.processor.force_flush()
    first, second = sorted(spans.get_finished_spans(), key=lambda s: s.attributes["pake.attempt"])
    assert sent == [f"traceparent: 00-{TRACE}-{s.context.span_id:016x}-01\r\n".encode() for s in (first, second)]
    assert first.parent.span_id == second.parent.span_id == int(PARENT, 16)  # siblings
    assert first.kind == second.kind == SpanKind.CLIENT
    assert second.attributes["http.request.resend_count"] == 1
    assert ex.span_id == f"{second.context.span_id:016x}"  # the access log names the try that answered


@pytest.mark.parametrize("headers", [
    [(b"traceparent", b"garbage"), (b"tracestate", b"v=1")],
    [(b"traceparent", f"00-{TRACE}-{PARENT}-01".encode())] * 2,  # two: neither is believed
    [(b"tracestate", b"v=1")],  # a state without a trace
])
def test_an_unusable_trace_context_is_replaced_and_never_forwarded(headers: list[tuple[bytes, bytes]],
                                                                  spans: InMemorySpanExporter) -> None:
    tracer = tracer_for(spans, sample=0.0)
    ex = exchange("inbound", headers)
    tracer.context.start(ex, b"http")
    assert ex.request.headers == []
    assert ex.trace is None and ex.trace_id is not None and ex.trace_id != TRACE  # a new, unsampled trace
    assert ex.trace_header == f"traceparent: 00-{ex.trace_id}-{ex.span_id}-00\r\n".encode()


def test_new_traces_are_sampled_by_ratio_on_the_trace_id(spans: InMemorySpanExporter) -> None:
    for sample, low, high in ((0.0, 0, 0), (1.0, 2000, 2000), (0.25, 380, 620)):
        tracer = tracer_for(spans, sample=sample)
        sampled = 0
        for _ in range(2000):
            ex = exchange()
            tracer.context.start(ex, b"http")
            assert ex.trace_id is not None and len(ex.trace_id) == 32
            sampled += ex.trace is not None  # an unsampled exchange gets no trace object
            assert (ex.trace_header == b"") == (ex.trace is not None)
            # the decision is the trace id's low 64 bits against the ratio, so every sidecar
            # with the same ratio decides a trace alike (W3C's random trace-id part)
            assert (ex.trace is not None) == (int(ex.trace_id[16:], 16) < tracer.context.bound)
            assert ex.span_id is not None and ex.span_id != ex.trace_id[16:]
        assert low <= sampled <= high, (sample, sampled)


def test_an_inbound_exchange_is_one_server_span_with_the_mesh_attributes(spans: InMemorySpanExporter) -> None:
    tracer = tracer_for(spans)
    ex = exchange("inbound", [(b"traceparent", f"00-{TRACE}-{PARENT}-01".encode())])
    ex.peer_identity = "spiffe://pake.local/service/web"
    tracer.context.start(ex, b"https")
    assert ex.trace is not None
    ex.trace.try_start(ex)  # tries to the local app have no span: the app continues the SERVER one
    assert ex.trace.header() == f"traceparent: 00-{TRACE}-{ex.span_id}-01\r\n".encode()
    ex.status, ex.flags, ex.reason, ex.service = 403, "RBAC", "no rule allows it", "orders"
    ex.trace.finish(ex)
    assert tracer.processor.force_flush()
    [span] = spans.get_finished_spans()
    assert span.kind == SpanKind.SERVER and span.parent.span_id == int(PARENT, 16)
    assert span.parent.is_remote and f"{span.context.span_id:016x}" == ex.span_id
    assert {k: span.attributes[k] for k in ("http.request.method", "url.scheme", "http.response.status_code",
                                            "pake.peer_identity", "pake.response_flags", "pake.reason")} == {
        "http.request.method": "GET", "url.scheme": "https", "http.response.status_code": 403,
        "pake.peer_identity": "spiffe://pake.local/service/web", "pake.response_flags": "RBAC",
        "pake.reason": "no rule allows it"}


class BlockedExporter(SpanExporter):
    """A collector that does not answer until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.got = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.entered.set()
        self.release.wait(5)
        self.got += len(spans)
        return SpanExportResult.FAILURE


def test_a_full_queue_drops_spans_and_counts_them_without_blocking() -> None:
    exporter = BlockedExporter()
    tracer = tracer_for(exporter, queue=4)
    for _ in range(50):
        ex = exchange()
        tracer.context.start(ex, b"http")
        assert ex.trace is not None
        ex.status = 200
        ex.trace.finish(ex)  # never waits for the blocked export thread
    counts = tracer.counts
    assert counts.dropped >= 50 - 4 - 8 and counts.queued - counts.taken <= 4
    exporter.release.set()
    tracer.processor.shutdown()
    assert counts.failed == exporter.got and counts.failed_batches >= 1 and counts.exported == 0


def test_the_tracing_section_is_checked_with_paths(tmp_path: Path) -> None:
    def load(tracing: object) -> object:
        path = tmp_path / "sidecar.yaml"
        path.write_text(yaml.safe_dump({"service": "web", "mesh": "mesh.yaml", "listeners": {"outbound": "127.0.0.1:0"},
                                        "tracing": tracing}))
        return load_bootstrap(path).tracing

    assert load(None) is None
    assert load({"endpoint": "http://collector:4318", "sample": "5%"}) == TracingConfig(
        endpoint="http://collector:4318/v1/traces", sample=0.05)
    assert load({"endpoint": "https://c.example/otlp/traces"}).endpoint == "https://c.example/otlp/traces"
    with pytest.raises(ConfigError) as err:
        load({"endpoint": "collector:4318", "sample": "150%", "batch": 10, "queue": 5, "color": "red"})
    problems = "\n".join(err.value.problems)
    for expected in ("tracing.endpoint: must be an http:// or https:// URL, got 'collector:4318'",
                     "tracing.sample: must be a percentage", "tracing.batch: must not exceed queue (5)",
                     "tracing.color: unknown key"):
        assert expected in problems, problems


def test_an_unsampled_caller_trace_is_continued_without_a_trace_object(spans: InMemorySpanExporter) -> None:
    """The 99% path: the caller's trace id and flag carry on, with one traceparent line for
    every try (naming this sidecar's span), the caller's own line gone, its tracestate kept."""
    tracer = tracer_for(spans, sample=1.0)  # the caller's "not sampled" wins over 100%
    ex = exchange("outbound", [(b"traceparent", f"00-{TRACE}-{PARENT}-00".encode()),
                               (b"tracestate", b"v=1")])
    tracer.context.start(ex, b"http")
    assert ex.trace is None and ex.trace_id == TRACE and ex.span_id not in (None, PARENT)
    assert ex.request.headers == [(b"tracestate", b"v=1")]
    assert ex.trace_header == f"traceparent: 00-{TRACE}-{ex.span_id}-00\r\n".encode()
    assert tracer.counts.queued == 0


def test_the_parser_picks_the_trace_context_out_and_keeps_it_in_the_headers() -> None:
    """Without tracing the headers pass through as they came; with it the tracer needs no
    second pass over them. Sent twice, a traceparent is believed by nobody (b"")."""
    one = exchange("inbound", [(b"Traceparent", f"00-{TRACE}-{PARENT}-01".encode()), (b"TraceState", b"v=1")])
    assert one.request.traceparent == f"00-{TRACE}-{PARENT}-01".encode() and one.request.tracestate
    assert one.request.headers == [(b"traceparent", f"00-{TRACE}-{PARENT}-01".encode()), (b"tracestate", b"v=1")]
    two = exchange("inbound", [(b"traceparent", f"00-{TRACE}-{PARENT}-01".encode())] * 2)
    assert two.request.traceparent == b"" and not two.request.tracestate
    none = exchange("inbound", [(b"accept", b"*/*")])
    assert none.request.traceparent is None and not none.request.tracestate


def test_new_ids_come_from_batches_and_the_sampling_bound_is_exact() -> None:
    """Ids are cut from one draw per 42 exchanges (a span id of 16 hex digits and a trace id
    of 32 each), and the decision compares the trace id's last 16 hex digits with the bound
    as text: exactly the numbers' order, at the bound itself too."""
    sampled: list[str] = []
    bound = 1 << 62  # a quarter of 2^64: TraceStart(0.25)'s
    per_batch = RequestIds.BATCH * 32 // 48  # 42 exchanges, and 32 digits left over
    # a batch whose exchanges alternate: the trace id's low 64 bits just below the bound,
    # then at it
    spans, traces = [], []
    for k in range(per_batch):
        low = bound - 1 if k % 2 == 0 else bound
        spans.append(f"{k:016x}")
        traces.append(f"{k + 1:016x}{low:016x}")
    tail = f"{7:016x}{9:016x}"  # the 43rd exchange's span id, and 16 digits no id takes
    text = "".join(span + trace for span, trace in zip(spans, traces)) + tail
    batch = bytes.fromhex(text)
    draws: list[int] = []

    def draw(n: int) -> bytes:
        draws.append(n)
        return batch

    start = TraceStart(0.25, lambda ex, trace_id, span_id, parent, scheme: sampled.append(trace_id), draw)
    assert start.bound == bound
    seen: list[Exchange] = []
    for _ in range(per_batch + 1):  # one more: a second draw, for its trace id
        ex = exchange()
        start.start(ex, b"http")
        seen.append(ex)
    assert len(draws) == 2
    for k, ex in enumerate(seen[:-1]):
        assert ex.trace_id == traces[k] and ex.span_id == spans[k]
        assert (ex.trace_id in sampled) == (k % 2 == 0)
        if k % 2:
            assert ex.trace_header == f"traceparent: 00-{ex.trace_id}-{ex.span_id}-00\r\n".encode()
    # the last exchange's span id ends the first draw, its trace id starts the second (here
    # the same batch again: its first 32 digits)
    assert seen[-1].span_id == tail[:16] and seen[-1].trace_id == text[:32]
    assert sampled == [traces[k] for k in range(0, per_batch, 2)] + [text[:32]]
