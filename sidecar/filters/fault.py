"""Fault injection: delay or abort a share of a route's requests, so teams can test how their
services cope. Off unless the route configures ``fault``.

``decide`` is the whole decision: a percentage draw (randomness injected), optionally only for
requests carrying ``when_header``, and, when ``from_headers`` is set, a delay or abort the
request asks for itself (``x-pake-fault-delay: 300ms``, ``x-pake-fault-abort: 503``). The
caller sleeps and answers; this module does neither. Pure: no asyncio imports.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from ..config.reader import parse_duration
from ..config.resilience import FaultConfig
from ..errors import LocalReply

__all__ = [
    "ABORT_HEADER",
    "DELAY_HEADER",
    "FAULT_HEADERS",
    "FaultAction",
    "NO_FAULT",
    "abort_reply",
    "decide",
]

DELAY_HEADER: Final = b"x-pake-fault-delay"  # "300ms", "2s", or whole milliseconds ("300")
ABORT_HEADER: Final = b"x-pake-fault-abort"  # a status code 400..599
# Mesh-internal: the data plane strips them before the request goes upstream.
FAULT_HEADERS: Final = (DELAY_HEADER, ABORT_HEADER)


@dataclass(frozen=True, slots=True)
class FaultAction:
    delay: float = 0.0  # seconds to hold the request before going on (or aborting)
    abort_status: int | None = None  # answer locally with this status instead of forwarding

    @property
    def active(self) -> bool:
        return self.delay > 0.0 or self.abort_status is not None


NO_FAULT: Final = FaultAction()


def decide(config: FaultConfig | None, headers: Sequence[tuple[bytes, bytes]],
           rand: Callable[[], float]) -> FaultAction:
    """The fault for one request. ``headers``: lower-case names (``RequestHead.headers``);
    ``rand``: uniform in [0, 1), drawn once for the delay, then once for the abort."""
    if config is None:
        return NO_FAULT
    if config.when_header is not None and _header(headers, config.when_header.encode()) is None:
        return NO_FAULT
    delay = 0.0
    abort: int | None = None
    if config.from_headers:
        delay = _header_delay(_header(headers, DELAY_HEADER), config.max_header_delay)
        abort = _header_abort(_header(headers, ABORT_HEADER))
    if not delay and config.delay is not None and rand() < config.delay.percent:
        delay = config.delay.fixed
    if abort is None and config.abort is not None and rand() < config.abort.percent:
        abort = config.abort.status
    if not delay and abort is None:
        return NO_FAULT
    return FaultAction(delay, abort)


def abort_reply(action: FaultAction, route: str) -> LocalReply:
    """The local reply for an aborted request; flag ``FI`` (fault injected), like Envoy's."""
    status = action.abort_status if action.abort_status is not None else 503
    return LocalReply(status, "fault_injected", f"fault injected by route {route}", "FI")


def _header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def _header_delay(value: bytes | None, maximum: float) -> float:
    """A bad value is ignored rather than refused: a fault header is a test aid, not input the
    request depends on."""
    if value is None:
        return 0.0
    text = value.decode("latin-1").strip()
    try:
        seconds = int(text) / 1000.0 if text.isdigit() and len(text) <= 9 else parse_duration(text)
    except ValueError:
        return 0.0
    return min(seconds, maximum)


def _header_abort(value: bytes | None) -> int | None:
    if value is None:
        return None
    text = value.strip()
    if len(text) == 3 and text.isdigit() and 400 <= int(text) <= 599:
        return int(text)
    return None
