"""One request/response pair as it passes through the sidecar.

The exchange is what filters read and annotate (principal, claims, roles) and what the
access log, metrics and audit log report at the end. One is made per request; it keeps
the snapshot the request started with, so a config swap never changes a request mid-way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .http.message import RequestHead

if TYPE_CHECKING:
    from .config.model import RouteConfig
    from .observability.tracing import ExchangeTrace

__all__ = ["Exchange"]


@dataclass(slots=True)
class Exchange:
    request: RequestHead
    listener: str  # "outbound" | "inbound" | "gateway"
    downstream_address: str  # the client's IP
    request_id: str
    start: float  # loop time when the request head was complete
    peer_identity: str | None = None  # SPIFFE ID the mTLS peer proved
    principal: str | None = None  # who is calling: SPIFFE ID, JWT sub or API-key principal
    claims: dict[str, Any] | None = None  # verified JWT claims
    roles: frozenset[str] = frozenset()  # from JWT claims or the API key
    trace_id: str | None = None  # W3C trace id (32 hex) when tracing is on: in every log line
    span_id: str | None = None  # this sidecar's span of the exchange (16 hex), likewise
    trace: ExchangeTrace | None = None  # the exchange's spans, when this exchange is sampled
    # the ``traceparent`` line each try sends when tracing is on and the exchange is not
    # sampled (made once: an unsampled exchange has no per-try span ids)
    trace_header: bytes = b""
    service: str = ""  # the service the request is addressed to
    route: RouteConfig | None = None
    cluster: str = "-"
    upstream: str = "-"  # host:port of the endpoint that answered
    attempts: int = 0
    status: int = 0
    flags: str = "-"
    reason: str = ""  # why a local reply was sent
    bytes_in: int = 0
    bytes_out: int = 0
    tags: dict[str, str] = field(default_factory=dict)  # extra facts for logs (rule, decision)
    # headers a filter adds to whatever response goes downstream (the rate limit's RateLimit-*);
    # they replace same-named ones from the upstream, so the client sees one value of each
    response_headers: tuple[tuple[bytes, bytes], ...] = ()
