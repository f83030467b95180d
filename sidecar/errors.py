"""Why the sidecar answered a request itself, and the one place that turns errors into replies.

Every refusal is a ``ProxyError`` subclass carrying its status, a short error code, and the
response flag (Envoy's vocabulary: ``NR`` no route, ``UF`` upstream connect failure, ``UT``
upstream timeout, ``UO`` overflow / breaker open, ``URX`` retries exhausted, ``UPE``
upstream protocol or identity error, ``DPE`` downstream protocol error). ``rescue()`` maps
an error to a ``LocalReply``; the access log and metrics carry the same flag, and so does the
reply itself, in its ``x-pake-flags`` header. The error code tells apart what a flag groups:
``UO`` is ``circuit_open`` (the breaker refuses the cluster for a while) or
``upstream_overflow`` (a concurrency limit is full right now).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

__all__ = [
    "CircuitOpen",
    "DownstreamProtocolError",
    "Forbidden",
    "LocalReply",
    "NoHealthyUpstream",
    "NoRoute",
    "PayloadTooLarge",
    "ProxyError",
    "RateLimited",
    "Unauthenticated",
    "UpstreamConnectError",
    "UpstreamIdentityError",
    "UpstreamOverflow",
    "UpstreamProtocolError",
    "UpstreamReset",
    "UpstreamTimeout",
    "rescue",
]


@dataclass(frozen=True, slots=True)
class LocalReply:
    """A response the sidecar makes itself: JSON ``{"error","detail","service"}`` and a flag
    (or flags joined by commas, e.g. ``UF,URX``), sent as ``x-pake-flags`` and logged."""

    status: int
    error: str
    detail: str
    flag: str
    headers: tuple[tuple[bytes, bytes], ...] = ()
    close: bool = False  # close the downstream connection after the reply

    def flagged(self, flag: str) -> LocalReply:
        """This reply with one more flag (``UF`` -> ``UF,URX``): the flags a reply is sent with
        are the ones its exchange is logged with."""
        return replace(self, flag=flag if self.flag == "-" else f"{self.flag},{flag}")

    def body(self, service: str) -> bytes:
        return json.dumps({"error": self.error, "detail": self.detail, "service": service},
                          separators=(",", ":")).encode()


class ProxyError(Exception):
    status = 500
    error = "internal_error"
    flag = "-"
    close = False

    def __init__(self, detail: str, *, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers

    def reply(self) -> LocalReply:
        return LocalReply(self.status, self.error, self.detail, self.flag, self.headers, self.close)


class DownstreamProtocolError(ProxyError):
    """Malformed or ambiguous HTTP from downstream: never forwarded, connection closed."""

    error = "bad_request"
    flag = "DPE"
    close = True

    def __init__(self, detail: str, status: int = 400, error: str = "bad_request") -> None:
        super().__init__(detail)
        self.status = status
        self.error = error


class PayloadTooLarge(ProxyError):
    status, error, flag = 413, "payload_too_large", "IV"
    close = True  # the body is not read: the connection cannot carry another request


class NoRoute(ProxyError):
    status, error, flag = 404, "no_route", "NR"


class Unauthenticated(ProxyError):
    status, error, flag = 401, "unauthenticated", "UAEX"


class Forbidden(ProxyError):
    status, error, flag = 403, "forbidden", "RBAC"


class RateLimited(ProxyError):
    status, error, flag = 429, "rate_limited", "RL"


class UpstreamConnectError(ProxyError):
    status, error, flag = 503, "upstream_connect_failure", "UF"


class NoHealthyUpstream(ProxyError):
    status, error, flag = 503, "no_healthy_upstream", "UH"


class CircuitOpen(ProxyError):
    """The cluster's circuit breaker is open (or half-open with its trials in flight): the
    service failed as a whole, and is left alone until the open interval has passed."""

    status, error, flag = 503, "circuit_open", "UO"


class UpstreamOverflow(ProxyError):
    """A concurrency limit of the cluster or the endpoint's pool is full (max_requests,
    max_retries, max_pending, max_connections): a matter of load now, not of failure."""

    status, error, flag = 503, "upstream_overflow", "UO"


class UpstreamIdentityError(ProxyError):
    status, error, flag = 503, "upstream_identity_mismatch", "UPE"


class UpstreamTimeout(ProxyError):
    status, error, flag = 504, "upstream_timeout", "UT"


class UpstreamReset(ProxyError):
    status, error, flag = 502, "upstream_reset", "UC"


class UpstreamProtocolError(ProxyError):
    status, error, flag = 502, "upstream_protocol_error", "UPE"


def rescue(exc: BaseException) -> LocalReply:
    """The single mapping from an error to what the downstream sees."""
    if isinstance(exc, ProxyError):
        return exc.reply()
    return LocalReply(500, "internal_error", f"{type(exc).__name__}", "-", close=True)
