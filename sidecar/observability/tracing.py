"""Distributed tracing: W3C trace context in and out, spans to an OTLP/HTTP collector.

Imported only when ``sidecar.yaml`` has a ``tracing`` section: it pulls in opentelemetry-sdk
and protobuf, which a sidecar without tracing does not pay for. Per exchange,
``trace_context`` (compiled with the hot path) continues the caller's ``traceparent`` (a
missing or malformed one starts a new trace; a malformed one is dropped with its
``tracestate``, never forwarded) and decides sampling (parent-based; a new trace by the
ratio, on its id); a sampled exchange comes back to the ``Tracer`` for its spans. Inbound
and gateway exchanges get a SERVER span; each upstream try of an outbound or gateway exchange
gets a CLIENT span, so retries are sibling tries; the ``traceparent`` sent upstream names the
span of that try.

Cost: an unsampled exchange gets ids and one ``traceparent`` line, nothing else: no trace
object, no per-try span ids (nobody records its spans), and no look at its headers (the
parser picked the trace context out in its own pass). A sampled one's spans are
built directly as ``ReadableSpan`` objects at its end (no tracer, context or sampler object
per span) and handed to the SDK's ``BatchSpanProcessor``; its thread encodes and posts them.
The queue is bounded: past it a span is dropped and counted. Export failures are counted and
logged (at most every ``_WARN_EVERY`` seconds), never raised into a request.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from random import getrandbits
from typing import TYPE_CHECKING, Final

import structlog
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from ..config.tracing import TracingConfig
from ..upstream.endpoint import Outcome
from .exposition import Collector, CollectorRegistry, CounterMetricFamily, GaugeMetricFamily, Metric
from .trace_context import TraceStart

if TYPE_CHECKING:
    from ..exchange import Exchange

__all__ = ["EXPORT_SWITCH_INTERVAL", "ExchangeTrace", "ExportCounts", "Tracer"]

log = structlog.get_logger("pake.tracing")

_WARN_EVERY = 10.0  # seconds between two "trace export failed" warnings
# The export thread encodes a batch in Python while holding the GIL: ~40 µs a span, 20 ms for
# 512 (the SDK's encoder, protobuf's upb). uvloop takes and gives back the GIL around every
# callback, so while the thread encodes, the loop gets it back only when CPython's switch
# interval makes the thread let go: a callback every 5 ms by default, and a sidecar at 1%
# sampled under load showed a p99 of 12-16 ms against 1 ms without tracing (make bench).
# A sidecar with tracing runs with this interval instead (seconds).
EXPORT_SWITCH_INTERVAL: Final = 0.0005
_HEADER_PREFIX = b"traceparent: 00-"
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_OK = Status(StatusCode.UNSET)
_ERROR = Status(StatusCode.ERROR)


def _new_span_id() -> str:
    return "%016x" % (getrandbits(64) or 1)


class ExportCounts:
    """What happened to spans after the exchange: written by two threads, each counter by one
    (``dropped`` and ``queued`` by the loop's, the rest by the export thread)."""

    __slots__ = ("queued", "dropped", "taken", "exported", "failed", "failed_batches")

    def __init__(self) -> None:
        self.queued = 0  # handed to the processor
        self.dropped = 0  # refused: the queue was full
        self.taken = 0  # taken off the queue by the export thread
        self.exported = 0
        self.failed = 0  # in a batch the collector did not take
        self.failed_batches = 0


class _CountingExporter(SpanExporter):
    """The OTLP exporter, counted; runs on the processor's thread only."""

    def __init__(self, inner: SpanExporter, counts: ExportCounts, endpoint: str) -> None:
        self.inner = inner
        self.counts = counts
        self.endpoint = endpoint
        self._last_warning = float("-inf")

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        counts = self.counts
        counts.taken += len(spans)
        try:
            result = self.inner.export(spans)
        except Exception:  # noqa: BLE001 - the export thread: a failure is counted, not raised
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            counts.exported += len(spans)
        else:
            counts.failed += len(spans)
            counts.failed_batches += 1
            now = time.monotonic()
            if now - self._last_warning >= _WARN_EVERY:
                self._last_warning = now
                log.warning("trace_export_failed", endpoint=self.endpoint, spans=len(spans),
                            failed_total=counts.failed)
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class _TraceCollector(Collector):
    def __init__(self, counts: ExportCounts) -> None:
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        c = self.counts
        spans = CounterMetricFamily("pake_trace_spans", "Finished sampled spans by what became of them",
                                    labels=["result"])
        spans.add_metric(["exported"], c.exported)
        spans.add_metric(["failed"], c.failed)
        spans.add_metric(["dropped"], c.dropped)
        yield spans
        yield CounterMetricFamily("pake_trace_export_failures", "Span batches the collector did not take",
                                  value=c.failed_batches)
        yield GaugeMetricFamily("pake_trace_queue_spans", "Spans waiting for export",
                                value=max(0, c.queued - c.taken))


class Tracer:
    """One per sidecar: sampling, the span sink and its counts."""

    def __init__(self, config: TracingConfig, service: str, *,
                 registry: CollectorRegistry | None = None,
                 exporter: SpanExporter | None = None) -> None:
        self.config = config
        self.context = TraceStart(config.sample, self._sampled)  # every exchange's start (compiled)
        self.resource = Resource.create({"service.name": config.service_name or service})
        self.scope = InstrumentationScope("pake-sidecar")
        self.counts = ExportCounts()
        # The exporter's own log lines would go to stderr from its thread, once per failure;
        # failures are counted and logged (rate-limited) by ``_CountingExporter`` instead.
        otel_log = logging.getLogger("opentelemetry")
        otel_log.addHandler(logging.NullHandler())
        otel_log.propagate = False
        inner = exporter or OTLPSpanExporter(endpoint=config.endpoint, timeout=config.timeout)
        self.processor = BatchSpanProcessor(
            _CountingExporter(inner, self.counts, config.endpoint), max_queue_size=config.queue,
            schedule_delay_millis=config.interval * 1000, max_export_batch_size=config.batch)
        self._closed = False
        if registry is not None:
            registry.register(_TraceCollector(self.counts))

    # --- hot path (called by ``self.context`` for a sampled exchange) --------------------
    def _sampled(self, ex: Exchange, trace_id: str, span_id: str, parent_id: str | None,
                 scheme: bytes) -> None:
        ex.trace = ExchangeTrace(self, ex.listener, trace_id, span_id, parent_id, True, scheme)

    def export(self, spans: list[ReadableSpan]) -> None:
        """Queue finished spans for the export thread; a full queue drops them (counted)."""
        counts = self.counts
        for span in spans:
            if self._closed or counts.queued - counts.taken >= self.config.queue:
                counts.dropped += 1
                continue
            counts.queued += 1
            self.processor.on_end(span)

    # --- end ------------------------------------------------------------------------
    async def close(self, timeout: float = 2.0) -> None:
        """Send what is queued, for at most ``timeout`` seconds: the export thread is a daemon,
        so a collector that does not answer holds neither the drain nor the exit."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def settle() -> None:
            if not done.done():
                done.set_result(None)

        def run() -> None:
            try:
                self.processor.shutdown()  # type: ignore[no-untyped-call]  # the SDK's shutdown is unannotated
            finally:
                try:
                    loop.call_soon_threadsafe(settle)
                except RuntimeError:
                    pass  # the loop is gone: nobody waits any more

        threading.Thread(target=run, name="pake-trace-flush", daemon=True).start()
        try:
            async with asyncio.timeout(timeout):
                await done
        except TimeoutError:
            log.warning("trace_flush_timeout", queued=max(0, self.counts.queued - self.counts.taken))


class ExchangeTrace:
    """The trace of one exchange: its ids, its try in flight, and (sampled) its finished spans.
    The router reports tries (``try_start``, ``try_status``, ``try_end``); ``finish`` exports."""

    __slots__ = ("tracer", "trace_id", "span_id", "parent_id", "sampled", "server", "client",
                 "scheme", "start_ns", "tries", "try_id", "try_start_ns", "try_status", "spans",
                 "_prefix", "_suffix")

    def __init__(self, tracer: Tracer, listener: str, trace_id: str, span_id: str,
                 parent_id: str | None, sampled: bool, scheme: bytes) -> None:
        self.tracer = tracer
        self.trace_id = trace_id
        self.span_id = span_id  # the SERVER span; outbound: the first try's CLIENT span
        self.parent_id = parent_id
        self.sampled = sampled
        self.server = listener != "outbound"  # a SERVER span for the exchange
        self.client = listener != "inbound"  # CLIENT spans for tries (inbound's go to its app)
        self.scheme = scheme
        self.start_ns = time.time_ns() if sampled else 0
        self.tries = 0
        self.try_id: str | None = None
        self.try_start_ns = 0
        self.try_status = 0
        self.spans: list[ReadableSpan] | None = [] if sampled else None
        self._prefix = b"%s%s-" % (_HEADER_PREFIX, trace_id.encode())
        self._suffix = b"-01\r\n" if sampled else b"-00\r\n"

    def try_start(self, ex: Exchange) -> None:
        """A try begins: its endpoint is picked (``ex.upstream``)."""
        if not self.client:
            return
        self.tries += 1
        if self.tries == 1 and not self.server:
            try_id = self.span_id
        else:
            try_id = _new_span_id()
            if not self.server:
                ex.span_id = try_id  # the access log names the try that answered
        self.try_id = try_id
        self.try_status = 0
        if self.sampled:
            self.try_start_ns = time.time_ns()

    def header(self) -> bytes:
        """The ``traceparent`` line for the try being sent: it names the try's CLIENT span
        (inbound: the SERVER span, which the app continues)."""
        return self._prefix + (self.try_id or self.span_id).encode() + self._suffix

    def try_response(self, status: int) -> None:
        """The try got a response head (forwarded, or dropped for a retry)."""
        self.try_status = status

    def try_end(self, ex: Exchange, outcome: Outcome) -> None:
        """The try is over (``Outcome`` as the breaker records it)."""
        try_id = self.try_id
        if try_id is None:
            return
        self.try_id = None
        if self.spans is None:
            return
        host, _, port = ex.upstream.rpartition(":")
        attrs: dict[str, str | int] = {
            "http.request.method": ex.request.method, "url.path": ex.request.path,
            "server.address": host, "network.peer.address": host, "pake.cluster": ex.cluster,
            "pake.attempt": self.tries, "pake.outcome": outcome.name.lower(),
            "pake.request_id": ex.request_id,
        }
        if port.isdigit():
            attrs["server.port"] = int(port)
            attrs["network.peer.port"] = int(port)
        if self.tries > 1:
            attrs["http.request.resend_count"] = self.tries - 1
        status = self.try_status
        if status:
            attrs["http.response.status_code"] = status
        failed = outcome is not Outcome.SUCCESS and outcome is not Outcome.CANCELLED
        if failed or status >= 400:
            attrs["error.type"] = str(status) if status >= 400 else outcome.name.lower()
        self.spans.append(self._span(
            f"{ex.request.method} {ex.cluster}", try_id, self.span_id if self.server else self.parent_id,
            SpanKind.CLIENT, attrs, _ERROR if (failed or status >= 400) else _OK,
            self.try_start_ns, time.time_ns()))

    def finish(self, ex: Exchange) -> None:
        """The exchange is over: its own span (SERVER, or an outbound exchange that never
        got to a try), then every span of it to the export queue."""
        if self.try_id is not None:
            self.try_end(ex, Outcome.CANCELLED)
        spans = self.spans
        if spans is None:
            return
        if self.server or not self.tries:
            head = ex.request
            route = ex.route.name if ex.route is not None else None
            attrs: dict[str, str | int] = {
                "http.request.method": head.method, "url.path": head.path,
                "url.scheme": self.scheme.decode(), "server.address": head.host,
                "network.peer.address": ex.downstream_address, "client.address": ex.downstream_address,
                "network.protocol.version": head.version, "pake.listener": ex.listener,
                "pake.request_id": ex.request_id, "pake.response_flags": ex.flags,
                "pake.attempts": ex.attempts,
            }
            if ex.status:
                attrs["http.response.status_code"] = ex.status
            if ex.service:
                attrs["pake.service"] = ex.service
            if route is not None:
                attrs["pake.route"] = route
            if ex.cluster != "-":
                attrs["pake.cluster"] = ex.cluster
            if ex.reason:
                attrs["pake.reason"] = ex.reason
            if ex.peer_identity:
                attrs["pake.peer_identity"] = ex.peer_identity
            if ex.principal:
                attrs["pake.principal"] = ex.principal
            error = ex.status >= 500 or not ex.status or (not self.server and ex.status >= 400)
            if error:
                attrs["error.type"] = str(ex.status) if ex.status else ex.flags
            spans.append(self._span(
                f"{head.method} {route}" if route is not None else head.method, self.span_id,
                self.parent_id, SpanKind.SERVER if self.server else SpanKind.CLIENT, attrs,
                _ERROR if error else _OK, self.start_ns, time.time_ns()))
        self.tracer.export(spans)

    def _span(self, name: str, span_id: str, parent_id: str | None, kind: SpanKind,
              attrs: dict[str, str | int], status: Status, start: int, end: int) -> ReadableSpan:
        trace_id = int(self.trace_id, 16)
        tracer = self.tracer
        parent = (SpanContext(trace_id, int(parent_id, 16), parent_id == self.parent_id, _SAMPLED)
                  if parent_id is not None else None)
        return ReadableSpan(
            name, context=SpanContext(trace_id, int(span_id, 16), False, _SAMPLED), parent=parent,
            resource=tracer.resource, attributes=attrs, kind=kind, status=status,
            start_time=start, end_time=end, instrumentation_scope=tracer.scope)
