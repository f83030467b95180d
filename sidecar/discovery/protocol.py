"""The control-plane wire protocol, shared by both sides: JSON messages over one WebSocket.

Sidecar -> control:  hello, ack, nack, heartbeat, csr, stats
Control -> sidecar:  snapshot, certificate, renew, heartbeat, error

A stream starts with the sidecar's ``hello``; the control plane answers with a ``snapshot``
(version + a mesh.yaml-shaped dict that ``sidecar.config.load.parse_mesh`` accepts + the trust
bundle), which the sidecar answers with ``ack`` or ``nack`` (then it keeps serving its previous
snapshot). ``renew`` asks the sidecar for a ``csr`` (it makes a new key each time); the answer is
a ``certificate``, acked with ``kind: certificate``. ``stats`` (every few seconds) carries
what the sidecar saw since its previous one: per route and destination the requests, errors,
a latency histogram over ``LATENCY_BUCKETS`` and breaker opens, plus its most recent denials;
the control plane answers for the whole mesh from these, without scraping.

Rules: pure and stdlib-only (the sidecar must not import aiohttp or control); ``decode`` checks
the size bound first, then every field's type, and raises ``ProtocolError`` naming the message
type, the field and the value; unknown fields are ignored (a newer peer may add some), unknown
message types are refused. The join token format and the CA-fingerprint check live here too, so
the sidecar's bootstrap and the control plane agree by construction.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import ssl
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, Literal, TypeAlias, get_args

__all__ = [
    "CONTROL_SERVICE",
    "MAX_MESSAGE_BYTES",
    "PROTOCOL_VERSION",
    "Ack",
    "Certificate",
    "Csr",
    "Denial",
    "ErrorMessage",
    "Heartbeat",
    "Hello",
    "JoinToken",
    "LATENCY_BUCKETS",
    "MAX_DENIALS",
    "MAX_STATS_ROUTES",
    "Message",
    "Nack",
    "ProtocolError",
    "Renew",
    "RouteStats",
    "Snapshot",
    "Stats",
    "bundle_fingerprints",
    "decode",
    "encode",
    "fingerprint_der",
    "hash_secret",
]

PROTOCOL_VERSION = 1
# A snapshot of a large mesh is tens of KiB; 4 MiB leaves room and still bounds a peer's memory.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# The SPIFFE service name of the control plane's own server certificate. Reserved: no join
# token is ever made for it, so no workload can pose as the control plane.
CONTROL_SERVICE = "pake-control"

AckKind: TypeAlias = Literal["snapshot", "certificate"]
BreakerState: TypeAlias = Literal["closed", "open", "half_open"]

# Upper bounds (seconds) of the stats latency histogram; a count list has one more entry (+Inf).
# The same buckets as the sidecar's pake_request_duration_seconds, so it can send its own.
LATENCY_BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                      0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
MAX_STATS_ROUTES = 512  # (route, destination) entries in one stats message
MAX_DENIALS = 32  # denials in one stats message; the sender counts the rest in denials_dropped


class ProtocolError(Exception):
    """A message that is not valid protocol; the text says which message, field and value."""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# === messages ===


@dataclass(frozen=True, slots=True)
class Hello:
    """First message of a stream: who the sidecar is and what it already holds."""

    TYPE: ClassVar[str] = "hello"
    node: str
    service: str
    address: str | None  # the reachable inbound address host:port; None: not an endpoint
    version: str | None = None  # the snapshot version it serves (from disk), if any
    app_healthy: bool = True
    protocol: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything this sidecar needs, as one versioned whole (never a delta)."""

    TYPE: ClassVar[str] = "snapshot"
    version: str
    mesh: dict[str, Any]
    bundle: str | None = None  # PEM roots the sidecar must trust (several during a CA rotation)
    certificate: str | None = None  # PEM chain, only when one was issued with this snapshot


@dataclass(frozen=True, slots=True)
class Ack:
    TYPE: ClassVar[str] = "ack"
    version: str
    kind: AckKind = "snapshot"


@dataclass(frozen=True, slots=True)
class Nack:
    """A rejected snapshot: the sidecar keeps serving the previous one; error is path-qualified."""

    TYPE: ClassVar[str] = "nack"
    version: str
    error: str
    kind: AckKind = "snapshot"


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Both ways: from the sidecar with its app's health; from the control plane with the
    interval it expects (a sidecar silent for the grace period loses its endpoint)."""

    TYPE: ClassVar[str] = "heartbeat"
    app_healthy: bool | None = None
    interval: float | None = None


@dataclass(frozen=True, slots=True)
class Renew:
    """The control plane asks for a CSR now (renewal at 2/3 of life, or `certs rotate`)."""

    TYPE: ClassVar[str] = "renew"
    reason: str = "renewal"


@dataclass(frozen=True, slots=True)
class Csr:
    TYPE: ClassVar[str] = "csr"
    csr: str  # PEM; the key behind it is new and never leaves the sidecar


@dataclass(frozen=True, slots=True)
class Certificate:
    """A new certificate chain (and the bundle it verifies against); acked by ``version``."""

    TYPE: ClassVar[str] = "certificate"
    version: str
    cert: str
    bundle: str


@dataclass(frozen=True, slots=True)
class ErrorMessage:
    """Sent before the control plane closes a stream it refuses: a code and a reason."""

    TYPE: ClassVar[str] = "error"
    code: str
    detail: str


@dataclass(frozen=True, slots=True)
class RouteStats:
    """What a sidecar saw for one route towards one destination service since its last stats.

    ``errors`` counts 5xx responses and local replies; ``latency`` holds one count per bucket
    of ``LATENCY_BUCKETS`` and a last one for slower (empty: no latency measured);
    ``breaker`` is the destination cluster's breaker state as the message is sent."""

    route: str
    destination: str
    requests: int = 0
    errors: int = 0
    latency: tuple[int, ...] = ()
    breaker_opens: int = 0
    breaker: BreakerState = "closed"


@dataclass(frozen=True, slots=True)
class Denial:
    """A request the sidecar refused by policy (RBAC, authn, rate limit), for the audit view.
    Strings are the sender's to truncate to 256 characters; ``path`` has no query string."""

    at: float  # unix time, seconds
    reason: str
    flag: str = "RBAC"
    status: int = 403
    source: str | None = None  # the principal: a SPIFFE ID or a JWT sub, if known
    method: str | None = None
    path: str | None = None


@dataclass(frozen=True, slots=True)
class Stats:
    """Sidecar -> control, periodically: counts since the previous stats message (deltas, so a
    lost message loses its interval and nothing else), bounded by MAX_STATS_ROUTES and
    MAX_DENIALS."""

    TYPE: ClassVar[str] = "stats"
    interval: float  # seconds the counts cover
    routes: tuple[RouteStats, ...] = ()
    denials: tuple[Denial, ...] = ()  # oldest first
    denials_dropped: int = 0  # denials in the interval that did not fit in ``denials``


Message: TypeAlias = (
    Hello | Snapshot | Ack | Nack | Heartbeat | Renew | Csr | Certificate | ErrorMessage | Stats
)
_TYPES: dict[str, type[Any]] = {
    cls.TYPE: cls
    for cls in (Hello, Snapshot, Ack, Nack, Heartbeat, Renew, Csr, Certificate, ErrorMessage,
                Stats)
}
# Per-field checks beyond the type; strings are bounded so a log line stays a line.
_MAX_STR = 256
_BIG_FIELDS = frozenset({"mesh", "bundle", "certificate", "cert", "csr", "error", "detail"})
_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):\d{1,5}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


def encode(message: Message) -> str:
    """One JSON text frame; the inverse of ``decode``."""
    body: dict[str, Any] = {"type": message.TYPE}
    for f in fields(message):
        value = getattr(message, f.name)
        if isinstance(value, tuple):  # Stats' entries: a tuple of small dataclasses
            value = [_plain(item) for item in value]
        body[f.name] = value
    text = json.dumps(body, separators=(",", ":"))
    if len(text) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"{message.TYPE}: {len(text)} bytes exceeds {MAX_MESSAGE_BYTES}")
    return text


def decode(data: str | bytes) -> Message:
    """Parse and check one frame; ProtocolError says what is wrong with it."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"message is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"message must be a JSON object, got {_show(body)}")
    kind = body.get("type")
    if not isinstance(kind, str) or (cls := _TYPES.get(kind)) is None:
        raise ProtocolError(f"type: unknown message type {_show(kind)}")
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in body:
            if _required(f):
                raise ProtocolError(f"{kind}.{f.name}: is required")
            continue
        values[f.name] = _check(kind, f.name, f.type, body[f.name])
    return cls(**values)  # type: ignore[no-any-return]  # (_TYPES holds only Message classes)


def _plain(item: Any) -> Any:
    return {f.name: getattr(item, f.name) for f in fields(item)}


def _entries(kind: str, name: str, value: list[Any], cls: type[Any], limit: int) -> tuple[Any, ...]:
    """A list of small records (a Stats message's routes or denials), each checked like a
    message of its own and named by its index: ``stats.routes[3].requests: ...``."""
    if len(value) > limit:
        raise ProtocolError(f"{kind}.{name}: more than {limit} entries")
    out = []
    for i, item in enumerate(value):
        where = f"{kind}.{name}[{i}]"
        if not isinstance(item, dict):
            raise ProtocolError(f"{where}: must be an object, got {_show(item)}")
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in item:
                if _required(f):
                    raise ProtocolError(f"{where}.{f.name}: is required")
                continue
            values[f.name] = _check(where, f.name, f.type, item[f.name])
        out.append(cls(**values))
    return tuple(out)


def _required(f: Any) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


_FIELD_TYPES: dict[str, tuple[type[Any], ...]] = {  # (type[Any]: isinstance keeps a value Any)
    "str": (str,),
    "str | None": (str, type(None)),
    "bool": (bool,),
    "bool | None": (bool, type(None)),
    "int": (int,),
    "float | None": (int, float, type(None)),
    "float": (int, float),
    "tuple[int, ...]": (list,),
    "tuple[RouteStats, ...]": (list,),
    "tuple[Denial, ...]": (list,),
    "BreakerState": (str,),
    "dict[str, Any]": (dict,),
    "AckKind": (str,),
}


def _check(kind: str, name: str, annotation: Any, value: Any) -> Any:
    allowed = _FIELD_TYPES[str(annotation)]
    # bool is an int in Python; a protocol number must not be `true`.
    if isinstance(value, bool) and bool not in allowed:
        raise ProtocolError(f"{kind}.{name}: wrong type, got {_show(value)}")
    if not isinstance(value, allowed):
        names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise ProtocolError(f"{kind}.{name}: must be {names}, got {_show(value)}")
    if isinstance(value, str) and name not in _BIG_FIELDS and len(value) > _MAX_STR:
        raise ProtocolError(f"{kind}.{name}: longer than {_MAX_STR} characters")
    if str(annotation) == "AckKind" and value not in get_args(AckKind):
        raise ProtocolError(f"{kind}.{name}: must be one of {get_args(AckKind)}, got {_show(value)}")
    if name == "address" and value is not None and not _ADDRESS.match(value):
        raise ProtocolError(f"{kind}.address: must be host:port, got {_show(value)}")
    if name in ("node", "service", "destination") and not _NAME.match(value):
        raise ProtocolError(f"{kind}.{name}: must be a simple name, got {_show(value)}")
    if name == "interval" and value is not None and not (0 < value < 86400):
        raise ProtocolError(f"{kind}.{name}: out of range, got {_show(value)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not 0 <= value < math.inf:
        raise ProtocolError(f"{kind}.{name}: must be a finite number ≥ 0, got {_show(value)}")
    if str(annotation) == "BreakerState" and value not in get_args(BreakerState):
        raise ProtocolError(f"{kind}.{name}: must be one of {get_args(BreakerState)}, "
                            f"got {_show(value)}")
    if name == "routes":
        return _entries(kind, name, value, RouteStats, MAX_STATS_ROUTES)
    if name == "denials":
        return _entries(kind, name, value, Denial, MAX_DENIALS)
    if name == "latency":
        if len(value) not in (0, len(LATENCY_BUCKETS) + 1) or not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value):
            raise ProtocolError(f"{kind}.latency: must be {len(LATENCY_BUCKETS) + 1} counts "
                                f"≥ 0 (one per LATENCY_BUCKETS bound and +Inf), got {_show(value)}")
        return tuple(value)
    return value


# === join tokens and the CA fingerprint ===

_TOKEN = re.compile(r"^pake1\.([0-9a-f]{16})\.([A-Za-z0-9_-]{32,64})\.([0-9a-f]{64})$")


@dataclass(frozen=True, slots=True)
class JoinToken:
    """``pake1.<id>.<secret>.<ca fingerprint>``: what `pakectl token create` prints.

    The control plane stores the id and a hash of the secret only. The fingerprint (SHA-256 of
    the root certificate's DER) lets a new sidecar check the control plane on first contact,
    before it trusts anything (kubeadm's discovery-token idea).
    """

    token_id: str
    secret: str = field(repr=False)
    ca_fingerprint: str

    @classmethod
    def parse(cls, text: str) -> JoinToken:
        m = _TOKEN.match(text.strip())
        if m is None:
            raise ProtocolError(
                "join token: not a PAKE join token (expected pake1.<id>.<secret>.<fingerprint>)"
            )
        return cls(m.group(1), m.group(2), m.group(3))

    def __str__(self) -> str:
        return f"pake1.{self.token_id}.{self.secret}.{self.ca_fingerprint}"

    def secret_hash(self) -> str:
        return hash_secret(self.secret)

    def trusts(self, bundle_pem: str) -> bool:
        """True when a root of ``bundle_pem`` is the CA this token names."""
        return any(
            hmac.compare_digest(fp, self.ca_fingerprint) for fp in bundle_fingerprints(bundle_pem)
        )


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def fingerprint_der(der: bytes) -> str:
    """SHA-256 of a certificate's DER as 64 lowercase hex digits (no colons)."""
    return hashlib.sha256(der).hexdigest()


_PEM_BLOCK = re.compile(
    r"-----BEGIN CERTIFICATE-----\s+.*?-----END CERTIFICATE-----", re.DOTALL
)


def bundle_fingerprints(bundle_pem: str) -> list[str]:
    """The fingerprint of every certificate in a PEM bundle, in order (stdlib only)."""
    out = []
    for block in _PEM_BLOCK.findall(bundle_pem):
        try:
            out.append(fingerprint_der(ssl.PEM_cert_to_DER_cert(block)))
        except ValueError:
            continue
    return out
