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

import re
from dataclasses import dataclass

from .reader import Fields
from .values import optional_section

__all__ = ["FaultAbort", "FaultConfig", "FaultDelay", "parse_fault"]

HEADER_NAME = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")


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


def parse_fault(node: Fields) -> FaultConfig | None:
    """``None`` when the section is absent or empty: faults are off unless configured."""
    if not node.data:
        node.done()
        return None
    d = FaultConfig()
    delay = None
    dnode = optional_section(node, "delay")
    if dnode is not None:
        fixed = dnode.duration("fixed", min=0.0)
        delay_percent = dnode.percent("percent", 1.0)
        if isinstance(fixed, float) and fixed > 3600:
            dnode.error("fixed", f"must be ≤ 1h, got {dnode.data['fixed']!r}")
        elif isinstance(fixed, float):
            delay = FaultDelay(fixed=fixed, percent=delay_percent)
        dnode.done()
    abort = None
    anode = optional_section(node, "abort")
    if anode is not None:
        status = anode.int("status", min=400, max=599)
        abort_percent = anode.percent("percent", 1.0)
        if isinstance(status, int):
            abort = FaultAbort(status=status, percent=abort_percent)
        anode.done()
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
    if dnode is None and anode is None and not from_headers:
        node.problems.add(node.path, "must configure delay, abort or from_headers: true")
    node.done()
    return config
