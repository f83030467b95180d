"""The router: the last stage. Sends the exchange to a cluster and sees it through.

Per exchange: fault injection (if the route has it), the weighted target, then tries. Per
try: the cluster's circuit breaker admits it (or 503 ``UO`` at once), the load balancer
picks an endpoint (preferring one not tried yet), a pooled connection carries the
re-serialised request, and the try ends with an ``Outcome`` that the breaker and the
outlier detector record. A failed try (connect failure, reset, per-try timeout, or a
retriable status, caught before any byte of it goes downstream) is retried when the retry
policy, its budget and the route deadline allow, after a jittered backoff.

Failure scope: a failure that one endpoint causes while another endpoint in use still answers
(``isolated_failure``) is that endpoint's. The outlier detector counts it and the retry goes
to another endpoint, spending neither retry budget nor a ``max_retries`` slot; the breaker
does not count it. Only failures of the service as a whole trip the breaker.

Everything is a callback: an idle pooled connection is used at once, and only opening a
new connection (or waiting for one) runs as a task. A request that fails on a *reused*
connection before any response byte is re-sent once without charging a retry: the
upstream closed an idle keep-alive connection just as we sent on it, which is routine.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import TYPE_CHECKING, Final

from ..config.model import RouteConfig
from ..errors import (LocalReply, NoHealthyUpstream, NoRoute, PayloadTooLarge, ProxyError,
                      UpstreamConnectError, UpstreamIdentityError, UpstreamReset, UpstreamTimeout)
from ..filters.fault import FAULT_HEADERS, FaultAction, abort_reply, decide
from ..http.message import ResponseHead
from ..http.writer import header_line, request_head
from ..upstream.circuit_breaker import Admission
from ..upstream.cluster import Cluster
from ..upstream.cluster_manager import LOCAL_APP
from ..upstream.endpoint import Outcome, isolated_failure, outcome_of_status
from ..upstream.pool import Pool
from ..upstream.retry import parse_retry_after
from ..upstream.upstream_connection import UpstreamConnection
from .routed import Tries

if TYPE_CHECKING:
    from ..listener.stream import Stream
    from ..pipeline import Pipeline

__all__ = ["Router"]

_MONOTONIC: Final = time.monotonic  # the hot path's clock (``deadline``)
# the last line of a try's head, for the counts a route's retries reach (no formatting per try)
_ATTEMPT_LINES: Final = tuple(b"x-pake-attempts: %d\r\n\r\n" % n for n in range(16))


def _last_line(expected_identity: str | None, attempts: int) -> bytes:
    """A try's last line: its ``x-pake-attempts`` and the blank line, or to a mesh peer
    (a cluster that expects an identity) the blank line alone. The peer's sidecar drops
    x-pake-attempts (MESH_INTERNAL) and tells its app its own count, so the line would cost
    both sides (~1.4k instructions on the peer, callgrind) for nothing."""
    if expected_identity is not None:
        return b"\r\n"
    if attempts < len(_ATTEMPT_LINES):
        return _ATTEMPT_LINES[attempts]
    return b"x-pake-attempts: %d\r\n\r\n" % attempts


class Router:
    """Drives the listener's ``Stream``, named for type checking only (no import at run time:
    the listener imports the router). A concrete type, not a protocol: compiled, the router
    reads and sets the stream's fields directly instead of by name (see ``routing.routed``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pipeline: Pipeline,
                 *, scheme: bytes = b"http", rng: random.Random | None = None) -> None:
        # No cluster registry here: an exchange's clusters are those of the snapshot it holds.
        self.loop = loop
        # the pipeline that made the router, typed as its class (imported for type checking
        # only, as ``Stream``): compiled, ``finish`` is a native call, where a stored bound
        # method was a generic one (~300 instructions an exchange)
        self.pipeline = pipeline
        self.scheme = scheme
        self._proto_line = header_line(b"x-forwarded-proto", scheme)
        # the Host line last made, and its authority: most requests name the same one as the
        # request before, and a compare is cheaper than encoding it and making the line
        self._host_of = ""
        self._host_line = header_line(b"host", b"")
        self._rng = rng or random.Random()

    def target(self, stream: Stream, route: RouteConfig) -> str:
        if stream.exchange.listener == "inbound":
            return LOCAL_APP
        targets = route.to
        if len(targets) == 1:
            return targets[0].service
        return stream.snapshot.choosers[id(route)].pick(self._rng.random()).service

    # === start ==============================================================================
    def start(self, stream: Stream) -> None:
        ex = stream.exchange
        route = ex.route
        assert route is not None
        name = self.target(stream, route)
        cluster = stream.snapshot.clusters.get(name)
        if cluster is None:
            self.pipeline.finish(stream, NoRoute(f"no cluster {name!r}").reply())
            return
        ex.cluster = name
        policy = cluster.retry_policy(route)
        tries = stream.tries = Tries(cluster, policy)
        stream.driver = self
        stream.bound_replay(policy.config.max_replay_body)
        limit = cluster.max_request_body
        if limit is not None:
            size = max(stream.head.content_length or 0, ex.bytes_in)  # (chunked: what came so far)
            if size > limit:
                self.pipeline.finish(stream, PayloadTooLarge(
                    f"request body of {size}{'+' if stream.head.chunked else ''} bytes exceeds"
                    f" {ex.service or name}'s limit of {limit}").reply())
                return
            if stream.head.chunked:
                stream.body_limit = limit  # checked as the rest of the body arrives
        stream.timeout = timeout = route.timeout or cluster.timeouts.route
        now = _MONOTONIC()
        stream.conn.route_deadline.set_at(now + timeout)
        policy.record_request(now)
        action = None
        if route.fault is not None:
            action = decide(route.fault, stream.head.headers, self._rng.random)
            stream.head.remove_headers(*FAULT_HEADERS)
        tries.head_bytes = self._head(stream, tries)
        if action is not None and action.delay:
            tries.timer = self.loop.call_later(action.delay, self._after_fault, stream, action,
                                               route.name)
        else:
            self._after_fault(stream, action, route.name, now)

    def _after_fault(self, stream: Stream, action: FaultAction | None, route: str,
                     now: float = -1.0) -> None:
        """Go on after an injected delay (if any): abort as injected, or send the first try
        (``now``: the clock as ``start`` read it, when nothing delayed the try)."""
        tries = stream.tries
        assert tries is not None  # (set by ``start``)
        tries.timer = None
        if action is not None and action.abort_status is not None:
            self._end(stream, abort_reply(action, route))
        else:
            self._attempt(stream, now=now)

    def _head(self, stream: Stream, tries: Tries) -> bytes:
        """The request head for upstream, without its blank line: each try appends its
        traceparent, its ``x-pake-attempts`` (to an app, not to a mesh peer) and the blank
        line. Unless the exchange is sampled, the first try's lines are known here and end
        the head already (``tries.tail`` bytes of it): a second join copied the whole head
        again for them (~450 instructions, callgrind)."""
        head = stream.head
        ex = stream.exchange
        conn = stream.conn
        extra = [conn.forwarded_for(head.forwarded_for)]
        if ex.listener == "gateway":
            # the edge: outside callers do not get to say how they connected
            if head.forwarded_proto is not None:
                head.remove_headers(b"x-forwarded-proto")
            extra.append(self._proto_line)
        elif head.forwarded_proto is None:
            extra.append(self._proto_line)
        if conn.peer_identity_line is not None:
            extra.append(conn.peer_identity_line)
        if head.chunked:
            extra.append(b"transfer-encoding: chunked\r\n")
        elif head.content_length is not None:
            extra.append(conn.request_length.line(head.content_length))
        if head.upgrade is not None:
            extra.append(b"connection: upgrade\r\n")
            extra.append(header_line(b"upgrade", head.upgrade))
        authority = head.authority
        if authority != self._host_of:
            self._host_of = authority
            self._host_line = header_line(b"host", authority.encode())
        if ex.trace is None:
            trace = ex.trace_header
            if len(trace):  # (a bytes object's truth is a generic call once compiled)
                extra.append(trace)
            last = _last_line(tries.cluster.expected_identity, 1)
            extra.append(last)
            tries.tail = len(trace) + len(last)
        return request_head(head, extra, end=False, host_line=self._host_line)

    # === tries ==============================================================================
    def _attempt(self, stream: Stream, isolated: bool = False, now: float = -1.0) -> None:
        """Send a try. ``isolated``: it retries a failure that was its endpoint's alone, so it
        goes to an endpoint that answers and takes none of the breaker's ``max_retries`` slots
        (which, like the budget, guard a service failing as a whole against a retry storm)."""
        tries = stream.tries
        assert tries is not None  # (set by ``start``)
        tries.timer = None
        if stream.finished:
            return
        cluster = tries.cluster
        ex = stream.exchange
        if now < 0:  # (a first try sent at once takes ``start``'s reading: one clock read less)
            now = _MONOTONIC()
        admission = cluster.breaker.try_acquire(now, retry=tries.retries > 0 and not isolated)
        if not isinstance(admission, Admission):
            last = tries.last_reply
            if last is not None:  # a retry the breaker will not allow: answer with the failure
                self._end(stream, last.flagged("URX"))
            else:
                self._end(stream, admission.error(cluster.name).reply())
            return
        tried = tries.tried
        endpoint = cluster.load_balancer.pick(cluster.endpoints, now,
                                              [e.address for e in tried] if tried else ())
        if endpoint is None:
            cluster.breaker.record(now, Outcome.CANCELLED, admission)
            self._end(stream, NoHealthyUpstream(f"cluster {cluster.name} has no available endpoint").reply())
            return
        tries.admission = admission
        tries.endpoint = endpoint
        endpoint.active_requests += 1
        tried.append(endpoint)
        ex.attempts += 1  # a try counts whether or not it got a connection (as in Envoy)
        pool = cluster.pool_of[endpoint]
        tries.pool = pool
        ex.upstream = pool.address_text
        if ex.trace is not None:  # tracing: a CLIENT span per try
            ex.trace.try_start(ex)
        per_try = tries.policy.config.per_try_timeout
        if per_try is not None:
            stream.conn.try_deadline.set_in(per_try)
        conn = pool.take_idle()
        if conn is not None:
            self._send(stream, tries, pool, conn, True)
        else:
            tries.connecting = self.loop.create_task(self._connect(stream, tries, pool, cluster))

    async def _connect(self, stream: Stream, tries: Tries, pool: Pool, cluster: Cluster) -> None:
        try:
            conn, reused = await pool.acquire(cluster.timeouts.connect)
        except ProxyError as exc:
            tries.connecting = None
            outcome = Outcome.CONNECT_FAILURE if isinstance(exc, UpstreamConnectError) else Outcome.CANCELLED
            self._try_failed(stream, outcome, exc.reply())
            return
        tries.connecting = None
        if stream.finished:
            pool.put_back(conn)
            return
        self._send(stream, tries, pool, conn, reused)

    def _send(self, stream: Stream, tries: Tries, pool: Pool, conn: UpstreamConnection,
              reused: bool) -> None:
        ex = stream.exchange
        expected = tries.cluster.expected_identity
        if expected is not None and conn.peer_identity != expected:
            conn.reusable = False
            pool.release(conn)
            self._try_failed(stream, Outcome.CONNECT_FAILURE, UpstreamIdentityError(
                f"{pool.address_text} presented {conn.peer_identity or 'no identity'}, expected"
                f" {expected}").reply(), retry=False)
            return
        tries.reused = reused
        conn.start(stream, stream.head.method == "HEAD")
        head = tries.head_bytes
        if tries.tail and ex.attempts != 1:  # a retry: the first try's lines off (``_head``)
            head = tries.head_bytes = head[:len(head) - tries.tail]
            tries.tail = 0
        if not tries.tail:  # this try's lines: one join, where two ``+`` copied the head twice
            trace = ex.trace_header if ex.trace is None else ex.trace.header()  # tracing: this try's traceparent
            head = b"".join((head, trace, _last_line(expected, ex.attempts)))
        stream.attach(conn, head, again=tries.head_sent)
        tries.head_sent = True

    def _release(self, stream: Stream, *, abort: bool = False, now: float = -1.0) -> None:
        """``now``: the monotonic clock's time, when the caller read it (else -1.0)."""
        conn = stream.upstream
        tries = stream.tries
        pool = tries.pool if tries is not None else None
        if conn is not None and pool is not None:
            if abort:
                conn.abort()
            stream.detach()
            pool.release(conn, now)

    def _try_done(self, stream: Stream, outcome: Outcome, now: float = -1.0) -> bool:
        """Exactly once per try: give the breaker its slot back and tell it (and the outlier
        detector) how the try went. True when the try failed and the failure is its endpoint's
        alone (``isolated_failure``): the breaker does not count it, a retry spends no budget."""
        stream.conn.try_deadline.clear()
        tries = stream.tries
        if tries is None:
            return False
        admission = tries.admission
        endpoint = tries.endpoint
        if admission is None or endpoint is None:
            return False
        tries.admission = None
        tries.endpoint = None
        if stream.exchange.trace is not None:  # tracing: the try's span ends
            stream.exchange.trace.try_end(stream.exchange, outcome)
        endpoint.active_requests -= 1
        cluster = tries.cluster
        if now < 0.0:
            now = _MONOTONIC()
        isolated = False
        if outcome is not Outcome.CANCELLED:
            failed = outcome is not Outcome.SUCCESS
            # scope first, from the other endpoints' last tries; then this one's own
            isolated = failed and isolated_failure(endpoint, cluster.endpoints, now)
            endpoint.failing = failed
        cluster.breaker.record(now, outcome, admission, isolated=isolated)
        if outcome is not Outcome.CANCELLED:
            cluster.outlier.record(now, endpoint, outcome, cluster.endpoints)
        return isolated

    def _try_failed(self, stream: Stream, outcome: Outcome, reply: LocalReply, *,
                    status: int | None = None, retry_after: float | None = None,
                    retry: bool = True) -> None:
        """A try ended without a response to forward: retry it, or answer with ``reply``."""
        isolated = self._try_done(stream, outcome)
        tries = stream.tries
        if stream.finished or tries is None:
            return
        tries.last_reply = reply
        if retry and not stream.response_started:
            decision = tries.policy.should_retry(
                tries.retries + 1, outcome, status, stream.head.method,
                body_replayable=stream.replayable(), response_started=False,
                now=_MONOTONIC(), retry_after=retry_after,
                deadline=stream.conn.route_deadline.when, isolated=isolated)
            if decision.retry:
                tries.retries += 1
                tries.timer = self.loop.call_later(decision.backoff, self._attempt, stream,
                                                   isolated)
                return
            if decision.reason in ("attempts_exhausted", "budget_exhausted", "deadline") and tries.retries:
                reply = reply.flagged("URX")  # in the reply's x-pake-flags, as in the access log
        self._end(stream, reply)

    # === upstream events (Driver) ============================================================
    def on_response_head(self, stream: Stream, head: ResponseHead) -> bool:
        """Forward this response (True), or drop it and retry (False)?"""
        status = head.status
        if stream.exchange.trace is not None:  # tracing: the try's status
            stream.exchange.trace.try_response(status)
        tries = stream.tries
        assert tries is not None  # (a response comes only to a try the router sent)
        outcome = tries.outcome = outcome_of_status(status)
        if outcome is Outcome.SUCCESS:
            return True
        retry_after = None
        if status in (429, 503):
            for name, value in head.headers:
                if len(name) == 11 and name.lower() == b"retry-after":
                    retry_after = parse_retry_after(value, time.time())
        now = _MONOTONIC()
        endpoint = tries.endpoint
        isolated = endpoint is not None and isolated_failure(endpoint, tries.cluster.endpoints, now)
        decision = tries.policy.should_retry(
            tries.retries + 1, outcome, status, stream.head.method,
            body_replayable=stream.replayable(), response_started=False, now=now,
            retry_after=retry_after, deadline=stream.conn.route_deadline.when, isolated=isolated)
        if not decision.retry:
            if tries.retries and decision.reason in ("attempts_exhausted", "budget_exhausted", "deadline"):
                tries.retries_exhausted = True
            return True
        self._release(stream, abort=True)  # the rest of this response is not wanted
        self._try_done(stream, outcome)
        tries.retries += 1
        tries.timer = self.loop.call_later(decision.backoff, self._attempt, stream, isolated)
        return False

    def on_response_end(self, stream: Stream) -> None:
        # One clock read for the exchange's end, where the pool's idle timer, the breaker's
        # record and the exchange's duration each read it (~115 instructions a read, callgrind)
        now = _MONOTONIC()
        self._release(stream, now=now)
        tries = stream.tries
        assert tries is not None and tries.outcome is not None  # (on_response_head came first)
        self._try_done(stream, tries.outcome, now)
        self._end(stream, None, now)

    def on_upstream_error(self, stream: Stream, exc: ProxyError) -> None:
        conn = stream.upstream
        tries = stream.tries
        assert tries is not None  # (an error comes only to a try the router sent)
        started = conn is not None and conn.response_started()
        raced = (isinstance(exc, UpstreamReset) and tries.reused and not tries.resent
                 and not started and stream.replayable())
        self._release(stream, abort=True)
        if raced and not stream.finished:
            tries.resent = True
            self._try_done(stream, Outcome.CANCELLED)  # the upstream did nothing wrong
            stream.exchange.attempts -= 1  # nor did the request: this re-send is free
            self._attempt(stream)
            return
        self._try_failed(stream, Outcome.RESET, exc.reply())

    def on_try_timeout(self, stream: Stream) -> None:
        tries = stream.tries
        assert tries is not None  # (the try deadline is armed only by ``_attempt``)
        per_try = tries.policy.config.per_try_timeout
        if stream.response_started:
            return  # the response is streaming: only the route timeout may cut it now
        self._release(stream, abort=True)
        self._try_failed(stream, Outcome.TIMEOUT, UpstreamTimeout(
            f"no response from {stream.exchange.upstream} within the per-try timeout {per_try}s").reply())

    def on_tunnel_open(self, stream: Stream) -> None:
        """101: from now on both connections carry raw bytes until either side closes."""
        stream.conn.route_deadline.clear()  # a tunnel lives as long as it is used:
        stream.conn.tunnel_opened()  # the tunnel idle timeout takes over
        self._try_done(stream, Outcome.SUCCESS)
        upstream = stream.upstream
        assert upstream is not None
        if stream.early_data:
            upstream.write(stream.early_data)
            stream.early_data = b""
        stream.conn.unblock_reading(stream.conn.BLOCK_BODY)

    def on_tunnel_closed(self, stream: Stream) -> None:
        stream.response_done = True
        stream.keep_alive = False
        self._end(stream, None)

    def on_timeout(self, stream: Stream) -> None:
        self._try_done(stream, Outcome.TIMEOUT)
        self._end(stream, UpstreamTimeout(
            f"no complete response from {stream.exchange.cluster} within {stream.timeout}s").reply())

    # === ending =============================================================================
    def abort(self, stream: Stream) -> None:
        """The downstream went away: stop everything this exchange holds."""
        self.end(stream, None)

    def end(self, stream: Stream, reply: LocalReply | None) -> None:
        """Finish the exchange now: release what it holds and answer with ``reply``."""
        self._try_done(stream, Outcome.CANCELLED)
        self._end(stream, reply)

    def _end(self, stream: Stream, reply: LocalReply | None, now: float = -1.0) -> None:
        if stream.finished:
            return
        conn = stream.conn
        conn.route_deadline.clear()
        conn.try_deadline.clear()
        tries = stream.tries
        if tries is not None:
            if tries.timer is not None:
                tries.timer.cancel()
                tries.timer = None
            if tries.connecting is not None:
                tries.connecting.cancel()
                tries.connecting = None
        if stream.upstream is not None:  # not released: the exchange did not complete on it
            self._try_done(stream, Outcome.CANCELLED, now)
            self._release(stream, abort=True, now=now)
        self.pipeline.finish(stream, reply, now)
