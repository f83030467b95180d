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
    start: float  # time.monotonic() when the request head was complete
    # ``request_id`` (a property): printable ASCII, a caller's valid X-Request-ID or hex we
    # made (log lines rely on it); given, or made from the head's bytes when first asked
    _request_id: str = ""
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
    # extra facts for logs (rule, decision): read by anyone, written through ``tag``,
    # ``tag_once`` and ``share_tags`` only (the dict may be shared by many exchanges)
    tags: dict[str, str] = field(default_factory=dict)
    _tags_shared: bool = False
    # headers a filter adds to whatever response goes downstream (the rate limit's RateLimit-*);
    # they replace same-named ones from the upstream, so the client sees one value of each
    response_headers: tuple[tuple[bytes, bytes], ...] = ()
    # the path and the request id as a log line writes them between quotes
    # (``json_text.path_text``, ``request_id_text``): made by the first line that needs them
    path_json: str = ""
    request_id_json: str = ""

    # Written out because the dataclass-generated ``__init__`` is interpreted Python even when
    # this module is compiled: one exchange per request made it 9k instructions of each
    # exchange's ~116k (callgrind). The fields above stay the documentation, repr and eq.
    def __init__(self, request: RequestHead, listener: str, downstream_address: str, request_id: str,
                 start: float, peer_identity: str | None = None, principal: str | None = None,
                 claims: dict[str, Any] | None = None, roles: frozenset[str] = frozenset(),
                 trace_id: str | None = None, span_id: str | None = None,
                 trace: ExchangeTrace | None = None, trace_header: bytes = b"", service: str = "",
                 route: RouteConfig | None = None, cluster: str = "-", upstream: str = "-",
                 attempts: int = 0, status: int = 0, flags: str = "-", reason: str = "",
                 bytes_in: int = 0, bytes_out: int = 0, tags: dict[str, str] | None = None,
                 response_headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        self.request = request
        self.listener = listener
        self.downstream_address = downstream_address
        self._request_id = request_id
        self.start = start
        self.peer_identity = peer_identity
        self.principal = principal
        self.claims = claims
        self.roles = roles
        self.trace_id = trace_id
        self.span_id = span_id
        self.trace = trace
        self.trace_header = trace_header
        self.service = service
        self.route = route
        self.cluster = cluster
        self.upstream = upstream
        self.attempts = attempts
        self.status = status
        self.flags = flags
        self.reason = reason
        self.bytes_in = bytes_in
        self.bytes_out = bytes_out
        self.tags = {} if tags is None else tags
        self._tags_shared = False
        self.response_headers = response_headers
        self.path_json = ""
        self.request_id_json = ""

    def tag(self, key: str, value: str) -> None:
        """Set a fact for the logs. A dict shared with other exchanges is copied first."""
        if self._tags_shared:
            self.tags = dict(self.tags)
            self._tags_shared = False
        self.tags[key] = value

    def tag_once(self, key: str, value: str) -> None:
        """``tag``, unless the fact is set already (the first filter to answer says why)."""
        if key not in self.tags:
            self.tag(key, value)

    def share_tags(self, tags: dict[str, str]) -> None:
        """Set every fact of ``tags``: a dict a filter made once for every exchange it
        tags alike (an RBAC rule's decision), never to be changed. An exchange with no
        facts yet takes the dict itself, which the access log then knows by identity: two
        sets and a compare of dicts were ~900 instructions an exchange (callgrind)."""
        if not self.tags:
            self.tags = tags
            self._tags_shared = True
        else:
            for key, value in tags.items():
                self.tag(key, value)

    @property
    def request_id(self) -> str:
        """The id as text: the one given, else the head's ``request_id`` (the caller's valid
        id, or the one the listener made, as forwarded) decoded the first time a log line, a
        span or a reply asks. Most exchanges of a sidecar without an access log never do: a
        decode, or a slice of the id batch's text, was ~200 instructions an exchange
        (callgrind)."""
        text = self._request_id
        if not text:
            raw = self.request.request_id
            if raw is not None and len(raw):  # (a bytes object's truth: a generic call compiled)
                text = self._request_id = raw.decode("ascii")
        return text

    @request_id.setter
    def request_id(self, value: str) -> None:
        self._request_id = value
