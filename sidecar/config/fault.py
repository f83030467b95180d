"""Config of fault injection, per route: delays and aborts for chaos testing.

Frozen slotted dataclasses and ``parse_*(node: Fields)``: bad values are reported with their
full path, unknown keys through ``Fields``. Defaults live here and nowhere else. Pure: no I/O.
The YAML shape; the values shown are the defaults, except where a comment says optional or e.g.::

    services:
      orders:
        routes:
          - match: {path_prefix: /}
            fault:                     # optional; absent: no faults. Needs delay, abort or both,
              delay: {fixed: 2s, percent: 10%}      # or from_headers. e.g.; percent default 100%
              abort: {status: 503, percent: 5%}     # e.g.; status 400..599
              when_header: x-chaos     # optional; only requests carrying this header are faulted
              from_headers: false      # true: honour x-pake-fault-delay: 300ms
                                       # and x-pake-fault-abort: 503 request headers
              max_header_delay: 10s    # cap on a delay asked for by a header
"""

from __future__ import annotations

from dataclasses import dataclass

from ..http.headers import HEADER_NAME
from .reader import Fields

__all__ = ["FaultAbort", "FaultConfig", "FaultDelay", "parse_fault"]



@dataclass(frozen=True, slots=True)
class FaultDelay:
    fixed: float
    percent: float = 1.0


@dataclass(frozen=True, slots=True)
class FaultAbort:
    status: int
    percent: float = 1.0


@dataclass(frozen=True, slots=True)
class FaultConfig:
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None
    when_header: str | None = None  # lower case; None: every request is a candidate
    from_headers: bool = False  # honour x-pake-fault-delay / x-pake-fault-abort
    max_header_delay: float = 10.0


def _delay(node: Fields) -> FaultDelay | None:
    fixed = node.duration("fixed", min=0.0)
    percent = node.percent("percent", 1.0)
    node.done()
    if isinstance(fixed, float) and fixed > 3600:
        node.error("fixed", f"must be ≤ 1h, got {node.data['fixed']!r}")
        return None
    return FaultDelay(fixed=fixed, percent=percent) if isinstance(fixed, float) else None


def _abort(node: Fields) -> FaultAbort | None:
    status = node.int("status", min=400, max=599)
    percent = node.percent("percent", 1.0)
    node.done()
    return FaultAbort(status=status, percent=percent) if isinstance(status, int) else None


def parse_fault(node: Fields) -> FaultConfig:
    """A route's ``fault`` section (read through ``Fields.optional``: absent means no faults;
    present, it must say what to inject)."""
    d = FaultConfig()
    configured = node.data.get("delay") is not None or node.data.get("abort") is not None
    delay = node.optional("delay", _delay)
    abort = node.optional("abort", _abort)
    when_header = node.str("when_header", None)
    if isinstance(when_header, str):
        if not HEADER_NAME.match(when_header.lower()):
            node.error("when_header", f"must be a header name, got {when_header!r}")
            when_header = None
        else:
            when_header = when_header.lower()
    from_headers = node.bool("from_headers", d.from_headers)
    config = FaultConfig(
        delay=delay,
        abort=abort,
        when_header=when_header,
        from_headers=from_headers,
        max_header_delay=node.duration("max_header_delay", d.max_header_delay),
    )
    if not configured and not from_headers:
        node.problems.add(node.path, "must configure delay, abort or from_headers: true")
    node.done()
    return config
