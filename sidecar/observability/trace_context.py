"""An exchange's W3C trace context: the caller's ``traceparent`` continued or a new trace
started, the sampling decision, and the ``traceparent`` line an unsampled exchange sends.

Apart from ``tracing`` because it runs for every exchange while tracing is on, sampled or
not, and so is compiled with the hot path (``sidecar.compiled``); ``tracing`` imports
OpenTelemetry and stays Python. As a method of ``tracing.Tracer`` this was 11k instructions an
exchange at 0% sampled, 18% of bench.hotpath's tiny exchange (callgrind). A sampled exchange
is handed to ``on_sampled`` (``Tracer``), which builds the object its spans are made from.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Final

from ..exchange import Exchange
from ..http.headers import RequestIds

__all__ = ["SampledStart", "TraceStart", "parse_traceparent"]

# version-traceid-parentid-flags, lower-case hex; a later version may append "-..." fields
_TRACEPARENT: Final = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[\x21-\x7e]*)?")
_ZERO_TRACE: Final = b"0" * 32
_ZERO_SPAN: Final = b"0" * 16

# (exchange, trace id, its span id, the caller's span id or None, scheme): a sampled start
SampledStart = Callable[[Exchange, str, str, "str | None", bytes], None]


def parse_traceparent(value: bytes) -> tuple[str, str, bool] | None:
    """``(trace_id, parent_span_id, sampled)`` of a W3C ``traceparent``, or None when it is
    not one (a wrong shape, version ``ff``, all-zero ids, version 00 with extra fields)."""
    m = _TRACEPARENT.fullmatch(value)
    if m is None:
        return None
    version, trace_id, parent_id, flags, _ = m.groups()
    if version == b"ff" or (version == b"00" and len(value) != 55):
        return None
    if trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    return trace_id.decode(), parent_id.decode(), bool(int(flags, 16) & 1)


class TraceStart:
    """Starts each exchange's trace; one per tracer (``Tracer.context``)."""

    def __init__(self, sample: float, on_sampled: SampledStart,
                 draw: Callable[[int], bytes] = os.urandom) -> None:
        self.bound = int(sample * (1 << 64))  # sampled: the trace id's low 64 bits below this
        # the same bound as 16 hex digits, compared with the trace id's last 16: fixed-width
        # lower-case hex orders as the numbers do (None: 100%, a bound of 2^64 has 17 digits)
        self._bound_hex = f"{self.bound:016x}" if self.bound < 1 << 64 else None
        self.on_sampled = on_sampled
        # new ids cut from one random draw per 42 exchanges or more, as request ids are (a new
        # trace takes a trace id of 32 hex digits and a span id of 16)
        self._ids = RequestIds(draw)

    def start(self, ex: Exchange, scheme: bytes) -> None:
        """The exchange's trace: the caller's, continued, or a new one. Strips the incoming
        ``traceparent`` (each try sends its own) and, when that was unusable, ``tracestate``.

        The parser picked both headers out in its own pass; an unsampled exchange gets its
        ids and its ``traceparent`` line (``ex.trace_header``) and no trace object."""
        head = ex.request
        found = head.traceparent
        if found is None:
            parent = None
            if head.tracestate:
                head.remove_headers(b"tracestate")  # a state without its trace means nothing
        else:
            parent = parse_traceparent(found) if found else None
            if parent is None:
                head.remove_headers(b"traceparent", b"tracestate")
            else:
                try:
                    head.pairs.remove((b"traceparent", found))  # (never in the block)
                except ValueError:
                    pass  # (the caller named it in Connection: already gone)
        # Ids cut from a batch (``RequestIds``): this method cost ~4.5k instructions an
        # exchange with a draw, a conversion to hex and an encode of its own, ~4.1k with two
        # ``take``s of 32 digits, the span's cut to 16 after, and ~2.45k with a take of 16
        # for the span from batches of ``os.urandom`` (callgrind; a take still pays its share
        # of the batch's draw). A zero id, which W3C forbids, has odds 2^-64. The sampling
        # draw is the trace id's low 64 bits, compared as hex (no parse).
        ids = self._ids
        span_id = ids.take(16)
        span_raw = ids.raw
        parent_id: str | None
        if parent is not None:
            trace_id, parent_id, sampled = parent
            trace_raw = b""
        else:
            trace_id, parent_id = ids.take(), None
            trace_raw = ids.raw
            bound = self._bound_hex
            sampled = bound is None or trace_id[16:] < bound
        ex.trace_id = trace_id
        ex.span_id = span_id
        if sampled:
            self.on_sampled(ex, trace_id, span_id, parent_id, scheme)
        else:  # (a caller's trace id is encoded here; a new one came as bytes from the batch)
            ex.trace_header = b"traceparent: 00-%b-%b-00\r\n" % (trace_raw or trace_id.encode(), span_raw)
