"""Which of the HTTP/1.1 wire's C helpers (``_wire.c``) the http modules use.

The compiled form has them. The request and response parsers' heads arrive with their header
lines as one list, their target or reason as one bytes object, and which of the parser's known
names (``names``) each line's name is as a byte a line, the arguments of
``on_headers_complete``, instead of an ``on_header`` call a line and an ``on_url`` or
``on_status`` call a piece (~1.4k instructions a line through httptools, bench/README.md).
A line whose name the parsers neither read nor drop (a plain line: not among ``special``, in
any case, and without an underscore) is not a pair but part of the head's block: the lines
as the writer writes them, one bytes object (``RequestHead.block``). A head is written by
one C call; where pipelined heads end in a read is found by one, and so
is whether a request id is visible ASCII. Beneath, a TLS connection's records are read and
written with the GIL held (``TLS_READ``, ``TLS_WRITE``).

The pure-Python form (and a compiled one whose module would not load: built for SSE4.2, on a
CPU without it) uses httptools' parsers, which call ``on_header``, the writer's join of a
head's pieces, and the loops in Python. A parser implements both sets of
callbacks; everything else it is called with is the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import httptools

__all__ = ["GATHERS_HEADERS", "HEAD", "HEAD_ENDS", "TLS_READ", "TLS_WRITE", "UNAVAILABLE", "VISIBLE", "names",
           "request_parser", "response_parser"]


def _wire() -> tuple[Any, str]:
    """The C helpers, or None and why not ("" for the pure form, which has none)."""
    # A module run as its source is the pure form (PAKE_PURE_PYTHON=1 also keeps the
    # extension from loading: compiled.SourceOnlyFinder).
    if __file__.endswith(".py"):
        return None, ""
    try:
        from . import _wire
    except ImportError as exc:  # not built (no C compiler), or built for another CPU
        return None, str(exc) or type(exc).__name__
    return _wire, ""


_LOADED: Final = _wire()
_C: Final = _LOADED[0]
# why a compiled form runs without the C helpers (the parsers then call Python a header
# line, ~40% of a realistic exchange more): the sidecar warns with it when ready; "" else
UNAVAILABLE: Final[str] = _LOADED[1]
_PARSER: Final = getattr(_C, "Parser", None)
GATHERS_HEADERS: Final = _PARSER is not None  # on_headers_complete gets the lines
# ``head(headers, extra, tail, *parts)``: parts, b"name: value\r\n" a pair, extra's lines and
# tail as one bytes object, sized once; None: writer's list of pieces and its join
HEAD: Final[Callable[..., bytes] | None] = getattr(_C, "head", None)
# ``head_ends(buf, at, end, heads)``: where the heads-th "\n\r\n" from ``at`` ends, else ``end``
# (a memchr a line); None: ``RequestParser.head_room`` counts and finds in Python
HEAD_ENDS: Final[Callable[[bytes, int, int, int], int] | None] = getattr(_C, "head_ends", None)
# ``visible(value)``: every byte visible ASCII (a request id kept); None: headers' own loop
VISIBLE: Final[Callable[[bytes], bool] | None] = getattr(_C, "visible", None)
# ``tls_read(sslobj, n)``, ``tls_write(sslobj, data)``: an ``_ssl._SSLSocket``'s ``read`` and
# ``write`` over memory BIOs with OpenSSL called with the GIL held (its methods give it up and
# take it back around each call, ~1.7k instructions an exchange on a TLS side: _tls_records.c);
# None: its methods
TLS_READ: Final[Callable[[object, int], bytes] | None] = getattr(_C, "tls_read", None)
TLS_WRITE: Final[Callable[[object, bytes | bytearray | memoryview], int] | None] = getattr(_C, "tls_write", None)


def names(spellings: tuple[bytes, ...]) -> object:
    """Header names a parser made with them gives as these very objects (made once, at import:
    an allocation and a free less a line whose name is one of them). None without the parser."""
    return None if _PARSER is None else _C.Names(spellings)


def request_parser(protocol: object, max_headers: int, known: object, max_target: int,
                   special: object) -> Any:
    """``protocol``'s llhttp for requests. Gathered, at most ``max_headers + 1`` lines of a
    head are kept (one more than the limit tells a head past it), trailing OWS is dropped
    from values, as ``RequestParser.on_header`` does, names among ``known`` (``names``) are
    those objects (their codes: their places in it plus one, the first 255), a target
    longer than ``max_target`` goes to ``on_url`` at once, and the plain lines (names not
    among ``special``, a ``names``) are the block, their names lower-cased."""
    if _PARSER is not None:
        return _PARSER(protocol, False, max_headers + 1, True, known, max_target, special, True)
    return httptools.HttpRequestParser(protocol)


def response_parser(protocol: object, max_headers: int, known: object, special: object) -> Any:
    """``protocol``'s llhttp for responses; values as received (as ``ResponseParser.on_header``),
    the reason with the head whatever its length (the head's bound holds it), and the plain
    lines the block, their names as received."""
    if _PARSER is not None:
        return _PARSER(protocol, True, max_headers + 1, False, known, 0, special, False)
    return httptools.HttpResponseParser(protocol)
