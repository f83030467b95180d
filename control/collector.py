"""The control plane as a small OTLP/HTTP trace collector (``pakectl serve --otlp HOST:PORT``):
``POST /v1/traces`` with an ``ExportTraceServiceRequest`` as protobuf or OTLP/JSON, kept in a
bounded store of the most recent traces, read by the admin API (``/api/traces``).

For a laptop mesh and the demo: a production mesh points its sidecars at a real collector
(Jaeger, Tempo, an OpenTelemetry Collector) and only the endpoint changes. Bounds: the
request body (after gzip, which aiohttp undoes as it reads, so a small bomb stays small),
the number of traces, their total size and the spans per trace; the least recently updated
trace goes first. A malformed body gets 400 with a ``google.rpc.Status`` saying why (as
OTLP/HTTP asks), in the request's own encoding. Large bodies are decoded off the loop.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from google.rpc import status_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

__all__ = ["CollectorLimits", "OtlpReceiver", "TraceStore", "decode_export"]

log = structlog.get_logger("pake.control.collector")

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
INLINE_DECODE_BYTES = 64 * 1024  # decode bigger bodies in a thread
_INVALID_ARGUMENT = 3  # google.rpc.Code


@dataclass(frozen=True, slots=True)
class CollectorLimits:
    max_body: int = 4 * 1024 * 1024  # per request, after decompression
    max_traces: int = 1000
    max_bytes: int = 32 * 1024 * 1024  # all stored spans, as their protobuf size
    max_spans_per_trace: int = 2000


class BadExport(ValueError):
    """A body that is not an ExportTraceServiceRequest; the text says why."""


# === decoding ===

_ID_FIELDS = ("traceId", "spanId", "parentSpanId")


def _hex_ids_to_base64(span: dict[str, Any]) -> None:
    """OTLP/JSON writes ids as hex; protobuf's JSON mapping wants base64 for bytes."""
    for key in _ID_FIELDS:
        value = span.get(key)
        if isinstance(value, str) and value:
            try:
                span[key] = base64.b64encode(bytes.fromhex(value)).decode()
            except ValueError:
                raise BadExport(f"{key}: not a hex id: {value[:40]!r}") from None
    for link in span.get("links") or ():
        if isinstance(link, dict):
            _hex_ids_to_base64(link)


def decode_export(body: bytes, content_type: str) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    if content_type == PROTOBUF:
        try:
            request.ParseFromString(body)
        except DecodeError as exc:
            raise BadExport(f"not an ExportTraceServiceRequest protobuf: {exc}") from None
        return request
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadExport(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadExport("the body must be a JSON object with resourceSpans")
    for rs in data.get("resourceSpans") or ():
        for ss in (rs.get("scopeSpans") or ()) if isinstance(rs, dict) else ():
            for span in (ss.get("spans") or ()) if isinstance(ss, dict) else ():
                if isinstance(span, dict):
                    _hex_ids_to_base64(span)
    try:
        json_format.ParseDict(data, request)
    except json_format.ParseError as exc:
        raise BadExport(f"not an OTLP/JSON ExportTraceServiceRequest: {exc}") from None
    return request


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, kind)


def _kind(span: Span) -> str:
    return Span.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_")


def spans_of(request: ExportTraceServiceRequest) -> list[dict[str, Any]]:
    """Each span as plain data, with its resource's service name; ids as lowercase hex."""
    out = []
    for rs in request.resource_spans:
        resource = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
        service = str(resource.get("service.name", "unknown"))
        for ss in rs.scope_spans:
            for span in ss.spans:
                if len(span.trace_id) != 16 or len(span.span_id) != 8:
                    raise BadExport(f"span {span.name[:60]!r}: trace_id must be 16 bytes and "
                                    f"span_id 8, got {len(span.trace_id)} and {len(span.span_id)}")
                duration_ns = max(0, span.end_time_unix_nano - span.start_time_unix_nano)
                out.append({
                    "trace_id": span.trace_id.hex(),
                    "span_id": span.span_id.hex(),
                    "parent_span_id": span.parent_span_id.hex() or None,
                    "name": span.name,
                    "kind": _kind(span),
                    "service": service,
                    "start_time": span.start_time_unix_nano / 1e9,
                    "start_unix_nano": str(span.start_time_unix_nano),
                    "duration_ms": duration_ns / 1e6,
                    "attributes": {kv.key: _value(kv.value) for kv in span.attributes},
                    "status": {"code": Status.StatusCode.Name(span.status.code)
                               .removeprefix("STATUS_CODE_"),
                               "message": span.status.message},
                    "events": [e.name for e in span.events][:32],
                    "size": span.ByteSize(),
                })
    return out


# === the store ===


@dataclass(slots=True)
class _Trace:
    spans: dict[str, dict[str, Any]] = field(default_factory=dict)  # span_id -> span
    size: int = 0


class TraceStore:
    """The most recent traces, bounded by count, bytes and spans per trace."""

    def __init__(self, limits: CollectorLimits = CollectorLimits()) -> None:
        self.limits = limits
        self._traces: OrderedDict[str, _Trace] = OrderedDict()  # least recently updated first
        self.size = 0
        self.spans_received = 0
        self.spans_dropped = 0  # over max_spans_per_trace
        self.traces_evicted = 0

    def __len__(self) -> int:
        return len(self._traces)

    def add(self, spans: Iterable[dict[str, Any]]) -> None:
        for span in spans:
            self.spans_received += 1
            trace = self._traces.get(span["trace_id"])
            if trace is None:
                trace = self._traces[span["trace_id"]] = _Trace()
            self._traces.move_to_end(span["trace_id"])
            old = trace.spans.get(span["span_id"])
            if old is None and len(trace.spans) >= self.limits.max_spans_per_trace:
                self.spans_dropped += 1
                continue
            delta = span["size"] - (0 if old is None else old["size"])
            trace.spans[span["span_id"]] = span
            trace.size += delta
            self.size += delta
        while self._traces and (len(self._traces) > self.limits.max_traces
                                or self.size > self.limits.max_bytes):
            _, evicted = self._traces.popitem(last=False)
            self.size -= evicted.size
            self.traces_evicted += 1

    def summaries(self, limit: int = 50) -> list[dict[str, Any]]:
        """The most recently updated traces first."""
        out = []
        for trace_id in reversed(self._traces):
            out.append(self._summary(trace_id, self._traces[trace_id]))
            if len(out) >= limit:
                break
        return out

    def _summary(self, trace_id: str, trace: _Trace) -> dict[str, Any]:
        spans = list(trace.spans.values())
        root = min((s for s in spans if s["parent_span_id"] not in trace.spans),
                   key=lambda s: s["start_time"])
        start = min(s["start_time"] for s in spans)
        end = max(s["start_time"] + s["duration_ms"] / 1000 for s in spans)
        return {"trace_id": trace_id, "root": root["name"], "service": root["service"],
                "start_time": start, "duration_ms": (end - start) * 1000, "spans": len(spans),
                "errors": sum(1 for s in spans if s["status"]["code"] == "ERROR"),
                "services": sorted({s["service"] for s in spans})}

    def get(self, trace_id: str) -> dict[str, Any] | None:
        """The trace's spans in start order, each with its ``children`` and ``depth``: what a
        waterfall draws."""
        trace = self._traces.get(trace_id.lower())
        if trace is None:
            return None
        children: dict[str, list[str]] = {}
        for s in trace.spans.values():
            if s["parent_span_id"] in trace.spans:
                children.setdefault(s["parent_span_id"], []).append(s["span_id"])
        spans = sorted(trace.spans.values(), key=lambda s: s["start_time"])

        def depth(span: dict[str, Any]) -> int:
            d, seen = 0, {span["span_id"]}
            while span["parent_span_id"] in trace.spans and span["parent_span_id"] not in seen:
                span = trace.spans[span["parent_span_id"]]
                seen.add(span["span_id"])
                d += 1
            return d

        return {**self._summary(trace_id, trace),
                "spans": [{**{k: v for k, v in s.items() if k != "size"},
                           "children": children.get(s["span_id"], []), "depth": depth(s)}
                          for s in spans]}


# === the receiver ===


def _reply(content_type: str, status: int, message: Any) -> web.Response:
    return web.Response(status=status, body=message.SerializeToString(), content_type=PROTOBUF) \
        if content_type == PROTOBUF else \
        web.Response(status=status, text=json_format.MessageToJson(message), content_type=JSON)


class OtlpReceiver:
    """``POST /v1/traces`` into a TraceStore. Counts what it accepted and refused, by reason."""

    def __init__(self, store: TraceStore) -> None:
        self.store = store
        self.requests: dict[str, int] = {}  # result -> count

    def _count(self, result: str) -> None:
        self.requests[result] = self.requests.get(result, 0) + 1

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.store.limits.max_body)
        app.router.add_post("/v1/traces", self.export)
        return app

    async def export(self, request: web.Request) -> web.Response:
        content_type = request.content_type
        if content_type not in (PROTOBUF, JSON):
            self._count("unsupported_media_type")
            return web.json_response(
                {"code": _INVALID_ARGUMENT,
                 "message": f"Content-Type must be {PROTOBUF} or {JSON}, got {content_type!r}"},
                status=415)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            self._count("too_large")
            return _reply(content_type, 413, status_pb2.Status(
                code=_INVALID_ARGUMENT,
                message=f"the body is over {self.store.limits.max_body} bytes: send smaller batches"))
        try:
            if len(body) > INLINE_DECODE_BYTES:
                spans = await asyncio.to_thread(lambda: spans_of(decode_export(body, content_type)))
            else:
                spans = spans_of(decode_export(body, content_type))
        except BadExport as exc:
            self._count("bad_request")
            log.warning("otlp_refused", reason=str(exc), peer=request.remote)
            return _reply(content_type, 400, status_pb2.Status(code=_INVALID_ARGUMENT,
                                                               message=str(exc)))
        self.store.add(spans)
        self._count("accepted")
        return _reply(content_type, 200, ExportTraceServiceResponse())
