"""Header tables shared by the request and response paths. Pure constants and helpers."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Final, Generic, TypeVar

from .wire import VISIBLE

__all__ = [
    "DEFAULT_MESH_TOKEN_HEADER",
    "HEADER_NAME",
    "HOP_BY_HOP",
    "MESH_INTERNAL",
    "REQUEST_SPECIAL",
    "RESERVED_HEADERS",
    "NameTable",
    "RequestIds",
    "connection_tokens",
    "content_length_value",
    "is_valid_request_id",
]

# RFC 9110 §5.1: a field name is a token. Matched against the lower-cased name, the form in
# which the mesh keeps header names (config, matchers, the parser's output).
HEADER_NAME: Final = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")

# RFC 9110 §7.6.1: meaningful for one hop only; framing is re-done by us on each side.
HOP_BY_HOP: Final = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"content-length", b"host", b"expect",
})

# Headers only the mesh may set. Stripped from anything arriving from outside the sidecar,
# so an app can trust them.
MESH_INTERNAL: Final = frozenset({b"x-pake-peer-identity", b"x-pake-attempts", b"x-pake-principal",
                                  b"x-pake-roles"})
# Request headers the parser reads or drops itself: hop-by-hop and mesh-internal ones, and
# those it keeps in a head's fields. Never in a head's block (message.py).
REQUEST_SPECIAL: Final = HOP_BY_HOP | MESH_INTERNAL | frozenset({
    b"x-request-id", b"x-forwarded-for", b"x-forwarded-proto", b"traceparent", b"tracestate"})
# Headers the sidecar sets for the app after authentication; never taken from outside.
RESERVED_HEADERS: Final = ("x-pake-peer-identity", "x-pake-principal", "x-pake-roles")
# Where the gateway's mesh token (the end user, signed) travels. Not in MESH_INTERNAL: it
# must pass the outbound and inbound sidecars when an app forwards it; the gateway strips it
# from outside callers and an inbound sidecar ignores it without an mTLS peer.
DEFAULT_MESH_TOKEN_HEADER: Final = "x-pake-user"


def connection_tokens(values: list[bytes]) -> set[bytes]:
    tokens: set[bytes] = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                tokens.add(token)
    return tokens


_ISALNUM: Final = bytes.isalnum  # compiled: a C static, called without a look-up by name
_HEX: Final = bytes.hex


def is_valid_request_id(value: bytes) -> bool:
    """Keep a caller's id only when it is short and printable: it lands in every log line."""
    # A loop by index, not ``bytes.translate`` or a regex: compiled, it costs a few
    # instructions a byte; translate builds a 256-byte table on every call (~2k instructions,
    # callgrind) and a regex match allocates its state (mypyc: 112 vs 281 vs 377 ns for a
    # 36-byte id). As Python, the loop is the slower one, by about 1 µs.
    n = len(value)
    if n == 0 or n > 128:
        return False
    check = VISIBLE
    if check is not None:  # the compiled form: one C pass (a UUID's loop below was ~1k instructions)
        return check(value)
    # Hex, as our ids are when the next sidecar reads them: ``isalnum`` (ASCII only, for
    # bytes) checks it in one C pass, ~380 instructions where the loop takes ~1,120 for 32
    # digits (compiled, callgrind). Called as the unbound method: by name, ~250 more. A UUID
    # fails at its first dash (+130) and goes through the loop; dropping its dashes first
    # (``replace``, a copy) cost more than the loop saved.
    if _ISALNUM(value):
        return True
    for i in range(n):
        c = value[i]
        if c < 0x21 or c > 0x7E:
            return False
    return True


class RequestIds:
    """The ids a sidecar gives requests that came without a usable one: 32 hex digits, 128
    random bits each, cut from one draw of ``BATCH`` ids. A draw and a conversion per id
    (``getrandbits(128).to_bytes(16).hex()``, then ``encode`` for the header) cost ~1.7k
    instructions an exchange (callgrind): ``getrandbits`` builds an int from bytes, and
    ``to_bytes``, ``hex`` and ``encode`` each allocate and convert. Two slices of a batch
    made in one draw cost a few hundred. ``take`` returns the id as text (the logs') and
    leaves it as bytes (the header's) in ``raw``.

    The batch is the kernel's random bytes (``os.urandom``, one ``getrandom`` call a batch),
    made hex by ``bytes.hex``: a take cost ~1,520 instructions with the draw as one
    ``getrandbits`` and ``int.to_bytes``, ~980 so (compiled, callgrind). ``take(16)`` cuts a
    16-digit id (a span's) from the same batch. ``take_raw`` cuts the bytes alone: a
    listener's id is forwarded as bytes, and its text is made only if a log line asks
    (``Exchange.request_id``)."""

    __slots__ = ("_draw", "_text", "_bytes", "_at", "raw")

    BATCH: Final = 64
    SIZE: Final = 32  # hex digits an id

    def __init__(self, draw: Callable[[int], bytes] = os.urandom) -> None:
        self._draw = draw  # n random bytes
        self._text = ""
        self._bytes = b""
        self._at = 0
        self.raw = b""

    def take(self, size: int = SIZE) -> str:
        at = self._next(size)
        self.raw = self._bytes[at:at + size]
        return self._text[at:at + size]

    def take_raw(self, size: int = SIZE) -> bytes:
        """``take``'s id as bytes only (``raw`` is left as it was)."""
        at = self._next(size)
        return self._bytes[at:at + size]

    def _next(self, size: int) -> int:
        """Where the next id of ``size`` digits starts in the batch; a new batch is drawn
        when what is left of this one is too short."""
        at = self._at
        if at + size > len(self._bytes):
            self._text = _HEX(self._draw(RequestIds.BATCH * RequestIds.SIZE // 2))
            self._bytes = self._text.encode("ascii")
            at = 0
        self._at = at + size
        return at


def content_length_value(value: bytes) -> int:
    """A Content-Length value llhttp accepted, as an int: ``int(value)`` gives the same.
    Up to 18 digits (below 2**63), read by a loop by index: compiled, a few instructions a
    digit, where ``int(bytes)`` costs ~460 (callgrind; once per request and per response with
    a body). Anything else (whitespace, more digits) goes to ``int``, and so do its errors."""
    n = len(value)
    if n == 0 or n > 18:
        return int(value)
    total = 0
    for i in range(n):
        c = value[i]
        if c < 0x30 or c > 0x39:
            return int(value)
        total = total * 10 + (c - 0x30)
    return total


T = TypeVar("T")


class NameTable(Generic[T]):
    """A fixed table of header names, looked up without hashing the name. The names
    httptools hands the parsers are fresh ``bytes`` objects, so a dict look-up first hashes
    one (siphash) and then compares: ~430 instructions a header, compiled (callgrind). Here
    a name's length and first byte index a list of the few names that share them, compared
    in turn (a ``memcmp``). Exact spellings only: a caller lower-cases what it must itself.
    """

    __slots__ = ("_names", "_values", "_longest")

    def __init__(self, entries: Mapping[bytes, T]) -> None:
        self._longest = max((len(name) for name in entries), default=0)
        size = (self._longest + 1) * 128
        names: list[list[bytes]] = [[] for _ in range(size)]
        values: list[list[T]] = [[] for _ in range(size)]
        for name, value in entries.items():
            if not name or name[0] > 127:
                raise ValueError(f"header name {name!r}: must be non-empty ASCII")
            at = _slot(len(name), name[0])
            names[at].append(name)
            values[at].append(value)
        self._names = [tuple(row) for row in names]
        self._values = [tuple(row) for row in values]

    def get(self, name: bytes) -> T | None:
        n = len(name)
        if n == 0 or n > self._longest:
            return None
        first = name[0]
        if first > 127:
            return None
        at = _slot(n, first)
        names = self._names[at]
        for i in range(len(names)):
            if names[i] == name:
                return self._values[at][i]
        return None


def _slot(length: int, first: int) -> int:
    """Where the names of this length and first byte (ASCII) are kept."""
    return length * 128 + first
