"""JSON string literals for log lines, built on the hot path.

``quote`` is the C function ``json.dumps`` uses for a string. It scans every character twice
and copies: about 30 instructions a character, half of an audit record's cost (callgrind).
Most of a line's strings repeat on every line (a service, the peer's SPIFFE ID, a rule, the
route, the authority): ``QuoteCache`` quotes each once and then costs a dict lookup.
"""

from __future__ import annotations

from json.encoder import encode_basestring_ascii
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from ..exchange import Exchange

__all__ = ["DECIMALS", "MAX_CACHED", "NumberField", "QuoteCache", "int_text", "path_text", "printable_text",
           "quote", "request_id_text", "trace_ids"]

MAX_CACHED: Final = 1024  # values a cache holds before it starts over
_MAX_CACHED_LENGTH: Final = 256  # longer values are quoted each time: the cache stays under ~0.6 MB
# ".000"..".999": a duration's or a time's three decimals by index, not float formatting
DECIMALS: Final = tuple(f".{i:03d}" for i in range(1000))
_SMALL_INTS: Final = tuple(str(i) for i in range(1000))
_NO_TRACE_IDS: Final = ',"trace_id":null,"span_id":null'
_ENCODE: Final = encode_basestring_ascii  # Final: compiled, a C static, not a dict look-up at each call


def quote(value: str) -> str:
    """``value`` as ``json.dumps`` writes it. A function of this module rather than the
    imported name: compiled, another module's read of an imported name is a look-up in its
    globals (~130 instructions) at every call, a call to this one is direct."""
    return _ENCODE(value)


def int_text(n: int) -> str:
    """``str(n)``, from a table below 1000 (a status, a try count, most durations in ms and
    many sizes): compiled, ``str`` boxes the int and formats it, ~170 instructions a call."""
    return _SMALL_INTS[n] if 0 <= n < 1000 else str(n)


def printable_text(value: str) -> str:
    """What goes between a JSON string's quotes for printable ASCII: a request id, which the
    listener keeps only when it is (``headers.is_valid_request_id``) or makes as hex, and a
    parsed path (``path_text``). Only a quote or a backslash needs escaping there, and few
    hold one: two ``in`` checks, where ``quote`` scans and copies a 32-character id for
    ~1,000 instructions."""
    if '"' in value or "\\" in value:
        return quote(value)[1:-1]
    return value


def path_text(ex: Exchange) -> str:
    """What goes between the quotes of the exchange's path as a JSON string, made once an
    exchange (its audit record, its access line and a reason write it). A path is what
    llhttp accepted in a request target: printable ASCII, no control character, no byte past
    0x7e (``test_json_text`` holds both parsers to it). So it is the path itself unless it
    holds a quote or a backslash (``printable_text``), where ``quote`` scanned and copied it
    (~290 instructions a short path, callgrind) and a reason sliced the quotes off again.
    (``isascii`` too would be a method called by name once compiled, ~210 instructions: the
    parser's check is the one relied on.)"""
    text = ex.path_json
    if not text:
        text = ex.path_json = printable_text(ex.request.path)
    return text


def request_id_text(ex: Exchange) -> str:
    """``printable_text(ex.request_id)``, made once an exchange, as ``path_text``."""
    text = ex.request_id_json
    if not text:
        text = ex.request_id_json = printable_text(ex.request_id)
    return text


def trace_ids(trace_id: str | None, span_id: str | None) -> str:
    """``,"trace_id":…,"span_id":…``: hex we made or checked (``trace_context``), so nothing
    to escape; null when tracing is off, as one constant fragment."""
    if not trace_id and not span_id:
        return _NO_TRACE_IDS
    return (',"trace_id":' + ('"' + trace_id + '"' if trace_id else "null")
            + ',"span_id":' + ('"' + span_id + '"' if span_id else "null"))


class NumberField:
    """``,"name":N`` whole, from a table below ``size``: a line is one string build, and each
    piece it joins costs ~75 instructions (compiled, callgrind), so a field whose small
    values repeat (a status, a try count, an empty body) is one piece, not two."""

    __slots__ = ("_prefix", "_table")

    def __init__(self, name: str, size: int, lead: str = "") -> None:
        # ``lead``: what the line has before the field (a string's closing quote), one piece less
        self._prefix = f'{lead},"{name}":'
        self._table = tuple(self._prefix + str(i) for i in range(size))

    def text(self, n: int) -> str:
        return self._table[n] if 0 <= n < len(self._table) else self._prefix + int_text(n)


class QuoteCache:
    """``quote`` with a memory: bounded in entries and in the length of what it keeps, so a
    client sending a new authority per request costs a re-quote, never memory. With a
    ``prefix``, what it keeps is the prefix and the quoted value: a whole ``,"key":"value"``
    fragment of a line, looked up where it was built (a concatenation, or an f-string of
    four pieces, ~500 instructions) on every line."""

    __slots__ = ("_quoted", "limit", "prefix")

    def __init__(self, limit: int = MAX_CACHED, prefix: str = "") -> None:
        self._quoted: dict[str, str] = {}
        self.limit = limit
        self.prefix = prefix

    def get(self, value: str) -> str:
        quoted = self._quoted.get(value)
        if quoted is not None:
            return quoted
        quoted = self.prefix + quote(value) if self.prefix else quote(value)
        if len(value) <= _MAX_CACHED_LENGTH:
            if len(self._quoted) >= self.limit:
                self._quoted.clear()
            self._quoted[value] = quoted
        return quoted

    def get_or_null(self, value: str | None) -> str:
        return "null" if value is None else self.get(value)

    def __len__(self) -> int:
        return len(self._quoted)
