"""The request path every listener shares: route match, filter chain, router, and the one
place where errors become local replies and every exchange is logged and counted.

Order: find the service and route -> run the listener's filter chain (authn, authz, rate
limit, validation) -> router. (Headers only the mesh may set were already dropped by the
parser.) A stage that refuses returns a ``LocalReply`` or raises a ``ProxyError``;
``finish`` sends it, and the access log and metrics carry its flag. All synchronous: the
router continues by callbacks.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Final

import structlog

from .config.model import ServiceConfig
from .errors import LocalReply, NoRoute, PayloadTooLarge, ProxyError, rescue
from .filters.base import BodyFilter
from .filters.chain import run_filters
from .listener.stream import Stream
from .observability.access_log import AccessLog
from .observability.metrics import Metrics
from .routing.route_table import RouteTable
from .routing.router import Router
from .snapshot_slot import SnapshotView

if TYPE_CHECKING:
    from .observability.trace_context import TraceStart
    from .observability.tracing import Tracer

__all__ = ["Pipeline"]

_MONOTONIC: Final = time.monotonic  # a C static once compiled, not the module's attribute at each call

log = structlog.get_logger("pake.pipeline")


class Pipeline:
    def __init__(self, *, service: str, metrics: Metrics,
                 access_log: AccessLog | None, loop: asyncio.AbstractEventLoop,
                 scheme: bytes = b"http", tracer: Tracer | None = None) -> None:
        self.service = service
        # None: tracing is off (and not imported); the tracer's compiled part, called directly
        self.trace_start: TraceStart | None = tracer.context if tracer is not None else None
        self.scheme = scheme
        self.metrics = metrics
        self.access_log = access_log  # replaced by a reload that changes the access log
        self.router = Router(loop, self, scheme=scheme)

    def start(self, stream: Stream) -> None:
        ex = stream.exchange
        if self.trace_start is not None:  # tracing: before any filter logs the exchange
            self.trace_start.start(ex, self.scheme)
        snap = stream.snapshot
        try:
            service = self._route(stream, snap)
            chain = snap.filters.get(ex.listener)
            reply = run_filters(chain, ex) if chain else None
            if reply is None:
                if ex.route is None:
                    head = stream.head
                    reply = NoRoute(f"no route for {head.method} {head.authority}{head.path}").reply()
                else:
                    # most services have no body filter: no look-up then (~130 instructions)
                    body_filter = snap.body_filters.get(ex.listener) if snap.body_filters else None
                    if body_filter is not None and body_filter.wants_body(ex):
                        # waiting for a body is a phase like any other: the route timeout,
                        # counted from the exchange's start, bounds it (408 when it fires)
                        assert service is not None  # (a route was found in it)
                        stream.timeout = ex.route.timeout or service.timeouts.route
                        stream.conn.route_deadline.set_in(
                            stream.timeout - (_MONOTONIC() - ex.start))
                        stream.collect(body_filter.max_body,
                                       lambda ok: self._body_collected(stream, body_filter, ok))
                        return
                    self.router.start(stream)
                    return
        except ProxyError as exc:
            reply = exc.reply()
        except Exception as exc:  # noqa: BLE001 - the edge: any bug becomes a 500, logged
            log.exception("exchange_failed", request_id=ex.request_id, trace_id=ex.trace_id)
            reply = rescue(exc)
        self.finish(stream, reply)

    def _body_collected(self, stream: Stream, body_filter: BodyFilter, ok: bool) -> None:
        """The body a filter asked for is here (or grew past its bound): check, then route."""
        stream.conn.route_deadline.clear()  # (the router arms it again for the exchange)
        ex = stream.exchange
        if not ok:
            reply: LocalReply | None = PayloadTooLarge(
                f"request body exceeds the {body_filter.max_body} bytes this route accepts").reply()
        else:
            try:
                pending = stream.pending  # None: no body came (none made a list)
                reply = body_filter.on_body(ex, b"".join(pending) if pending is not None else b"")
            except Exception as exc:  # noqa: BLE001 - the edge: a filter bug becomes a 500
                log.exception("body_filter_failed", request_id=ex.request_id, trace_id=ex.trace_id)
                reply = rescue(exc)
        if reply is not None:
            ex.tag_once("filter", body_filter.name)
            self.finish(stream, reply)
        else:
            self.router.start(stream)

    def refuse(self, stream: Stream, reply: LocalReply) -> None:
        """End an exchange in flight with ``reply`` (its request broke the rules mid-body)."""
        if stream.driver is not None:
            self.router.end(stream, reply)
        else:
            self.finish(stream, reply)

    def abort(self, stream: Stream) -> None:
        """The downstream connection is gone."""
        if stream.exchange.flags == "-":
            stream.exchange.flags = "DC"
        if stream.driver is not None:
            self.router.abort(stream)
        else:
            self.finish(stream, None)

    def _route(self, stream: Stream, snap: SnapshotView) -> ServiceConfig | None:
        ex = stream.exchange
        if ex.listener != "outbound":  # inbound and gateway serve the local service's routes
            service = snap.local_service
        else:
            service = snap.routes.service_for_host(stream.head.host)
        if service is None:
            return None
        ex.service = service.name
        ex.route = RouteTable.route(service, stream.head)
        return service

    def finish(self, stream: Stream, reply: LocalReply | None, now: float = -1.0) -> None:
        """``now``: the monotonic clock's time when the caller read it at the exchange's end
        (the router, at the response's end), else -1.0 and it is read here."""
        if stream.finished:
            return
        stream.finished = True
        stream.snapshot.clusters.release()  # held since the head was parsed (SnapshotSlot.hold)
        conn = stream.conn
        if reply is not None and not conn.closed:
            stream.send_local_reply(reply, self.service)
        ex = stream.exchange
        tries = stream.tries
        if tries is not None and tries.retries_exhausted:
            ex.flags = "URX" if ex.flags == "-" else ex.flags + ",URX"
        if ex.trace is not None:  # tracing: the exchange's spans are complete
            ex.trace.finish(ex)
        if now < 0.0:
            now = _MONOTONIC()
        duration = now - ex.start
        self.metrics.exchange_done(ex, duration)
        if self.access_log is not None:
            self.access_log.log(ex, duration)
        conn.stream_done(stream, now)
