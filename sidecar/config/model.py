"""The config of the mesh as frozen dataclasses.

Two documents: the **bootstrap** (``sidecar.yaml``: who am I, where do I listen, where does
my mesh config come from) and the **mesh** config (services, endpoints, routes, and the
policies later issues add), which a file gives in static mode and the control plane
pushes later. Objects are immutable so a snapshot can be shared by every exchange that
started under it. Defaults live here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .audit import AuditConfig
from .log_levels import LogFormat, LogLevels
from .mesh_tokens import MeshTokens
from .policy import MeshPolicy, ServiceAuthn
from .rate_limit import RateLimitConfig
from .rbac import RbacPolicy
from .tracing import TracingConfig
from .validation import ValidationConfig
from .resilience import FaultConfig, RetryConfig, ServiceResilience

__all__ = [
    "AccessLogConfig",
    "Address",
    "Bootstrap",
    "ControlConfig",
    "DownstreamTimeouts",
    "Limits",
    "ListenerConfig",
    "MeshConfig",
    "OverloadConfig",
    "PoolConfig",
    "RouteConfig",
    "RouteMatch",
    "ServerTlsFiles",
    "ServiceConfig",
    "ServiceTimeouts",
    "TlsFiles",
    "WeightedTarget",
]

Address = tuple[str, int]
Mode = Literal["sidecar", "gateway"]


# === bootstrap ===========================================================================


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what one downstream may make us hold. Nothing grows without one."""

    max_connections: int = 10_000  # per listener, TLS handshakes in progress included
    max_total_connections: int = 20_000  # all listeners together (docs/operations.md sizes it)
    max_tls_handshakes: int = 1024  # in progress, per TLS listener
    max_request_line: int = 8 * 1024  # request line (method + target + version) -> 414
    max_headers_size: int = 60 * 1024  # all header lines together -> 431
    max_header_count: int = 100  # -> 431
    max_request_body: int | None = None  # None: streamed, unbounded; else -> 413
    max_pipelined: int = 16  # requests parsed ahead of the one being answered
    allow_underscores_in_headers: bool = False  # x_user aliases x-user in many apps


@dataclass(frozen=True, slots=True)
class OverloadConfig:
    """Past a threshold new requests get a fast 503 ``OL`` and keep-alive is off until the
    process is back below it (sidecar.overload). None: that signal is not watched."""

    max_memory: int | None = 1536 * 1024 * 1024  # resident memory (RSS); docs/operations.md
    max_loop_lag: float | None = None  # how late the event loop runs a timer
    interval: float = 0.25  # sampling period of both (never per request)


@dataclass(frozen=True, slots=True)
class DownstreamTimeouts:
    request_headers: float = 10.0  # from the first byte of a request to its last header -> 408
    idle: float = 60.0  # keep-alive: no request in flight and nothing received
    drain: float = 20.0  # SIGTERM: how long in-flight requests may take to finish
    tls_handshake: float = 10.0  # a TLS client must finish its handshake within this
    tunnel_idle: float = 3600.0  # after a 101: no byte either way for this long closes both sides


@dataclass(frozen=True, slots=True)
class ServerTlsFiles:
    """A plain TLS server certificate for outside clients (the gateway): no client cert."""

    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    name: Literal["outbound", "inbound", "admin", "gateway"]
    address: Address
    tls: bool = False  # mesh mTLS with the workload certificate (inbound)
    server_tls: ServerTlsFiles | None = None  # server-only TLS for outside clients (gateway)


@dataclass(frozen=True, slots=True)
class TlsFiles:
    cert: Path
    key: Path
    bundle: Path
    # Offer cached TLS sessions to upstream sidecars. Off by default: with CPython's ssl on
    # OpenSSL 3, a client offering sessions grew by ~2.5-6.6 KB of native memory per new
    # connection without bound in our churn benchmark. Sidecars still resume for clients
    # that offer; with keep-alive pools a new upstream connection is rare anyway.
    resume_upstream_sessions: bool = False


@dataclass(frozen=True, slots=True)
class ControlConfig:
    """``control:``: the mesh config and the certificates come from the control plane.

    The token is read only until the sidecar has joined: afterwards the state directory holds
    its key, certificate, bundle and last good snapshot, and a restart (control plane up or
    down) needs nothing else. Several addresses are replicas: the client fails over.
    """

    addresses: tuple[Address, ...]
    state_dir: Path
    token_file: Path | None = None
    node: str | None = None  # the node id in `pakectl status`; default: made once, kept in state_dir
    connect_timeout: float = 5.0  # TCP + TLS + WebSocket handshake, and each join request
    hello_timeout: float = 10.0  # from the hello to the first message of the control plane
    reconnect_max: float = 5.0  # the cap of the jittered exponential reconnect backoff


@dataclass(frozen=True, slots=True)
class AccessLogConfig:
    enabled: bool = True
    path: str = "stdout"  # or a file path


@dataclass(frozen=True, slots=True)
class Bootstrap:
    source: Path
    service: str
    mode: Mode
    app: Address | None
    listeners: tuple[ListenerConfig, ...]
    mesh_path: Path
    limits: Limits = Limits()
    overload: OverloadConfig = OverloadConfig()
    timeouts: DownstreamTimeouts = DownstreamTimeouts()
    access_log: AccessLogConfig = AccessLogConfig()
    tls: TlsFiles | None = None
    log_level: LogLevels = LogLevels()  # per component; applied live on reload
    log_format: LogFormat = "auto"  # json, or console on a terminal (or when asked)
    audit: AuditConfig = AuditConfig()
    tracing: TracingConfig | None = None  # spans to an OTLP collector; None: off, not imported
    control: ControlConfig | None = None  # exclusive with mesh_path's file and tls

    def listener(self, name: str) -> ListenerConfig | None:
        for listener in self.listeners:
            if listener.name == name:
                return listener
        return None


# === mesh ================================================================================


@dataclass(frozen=True, slots=True)
class ServiceTimeouts:
    route: float = 15.0  # whole exchange, all tries -> 504 UT
    connect: float = 1.0  # one TCP (+TLS) connect -> 503 UF


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """Upstream connections per endpoint."""

    max_connections: int = 1024
    max_idle: int = 64
    idle_timeout: float = 60.0
    max_pending: int = 1024  # exchanges waiting for a connection, per endpoint -> 503 UO


@dataclass(frozen=True, slots=True)
class RouteMatch:
    path_prefix: str = "/"
    path_exact: str | None = None
    methods: frozenset[str] = frozenset()  # empty: any method
    headers: tuple[tuple[str, str], ...] = ()  # (lower-case name, exact value)


@dataclass(frozen=True, slots=True)
class WeightedTarget:
    service: str
    weight: int = 100


@dataclass(frozen=True, slots=True)
class RouteConfig:
    name: str
    match: RouteMatch
    to: tuple[WeightedTarget, ...]
    timeout: float | None = None  # overrides the target service's route timeout
    retries: RetryConfig | None = None  # overrides the target service's retry policy
    fault: FaultConfig | None = None  # fault injection, off unless configured
    rate_limit: RateLimitConfig | None = None
    validation: ValidationConfig | None = None


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    name: str
    endpoints: tuple[Address, ...]
    hosts: tuple[str, ...]  # Host/authority names routed to this service (lower case, no port)
    routes: tuple[RouteConfig, ...]
    timeouts: ServiceTimeouts = ServiceTimeouts()
    pool: PoolConfig = PoolConfig()
    max_request_body: int | None = None  # tighter than the listener's bound, for this service
    resilience: ServiceResilience = ServiceResilience()  # retries, breaker, health, outlier, lb
    authn: ServiceAuthn | None = None  # which credentials this service's sidecar accepts
    policy: RbacPolicy | None = None  # who may call it (enforced on its inbound / gateway)
    tls: bool = True  # reached over mesh mTLS when the sidecar has a certificate; false for
    #                   endpoints that are not sidecars (a database, an outside API)


@dataclass(frozen=True, slots=True)
class MeshConfig:
    trust_domain: str
    services: Mapping[str, ServiceConfig] = field(default_factory=dict)
    policy: MeshPolicy = MeshPolicy()  # JWT providers and API keys, shared by services
    mesh_tokens: MeshTokens | None = None  # the end user's signed identity inside the mesh
    version: str = ""  # content hash, or the control plane's version
