"""Which driver of llhttp the request and response parsers use.

The compiled form has its own (``_llhttp.c``): a head's header lines reach the parser as one
list, the argument of ``on_headers_complete``, instead of one ``on_header`` call a line
(~1.4k instructions each through httptools, bench/README.md). Everywhere else, and when the
binding was built for another httptools than the one installed, httptools' own parsers call
``on_header``. A parser implements both callbacks; everything else they call is the same.
"""

from __future__ import annotations

from typing import Any, Final

import httptools

__all__ = ["GATHERS_HEADERS", "request_parser", "response_parser"]


def _binding() -> Any:
    # A module run as its source is the pure form, which drives llhttp through httptools
    # only (PAKE_PURE_PYTHON=1 also keeps the extension from loading: compiled.SourceOnlyFinder).
    if __file__.endswith(".py"):
        return None
    try:
        from . import _llhttp
    except ImportError:  # not built (no C compiler), or built for another httptools
        return None
    return _llhttp.Parser


_PARSER: Final = _binding()
GATHERS_HEADERS: Final = _PARSER is not None  # on_headers_complete gets the lines


def request_parser(protocol: object, max_headers: int) -> Any:
    """``protocol``'s llhttp for requests. Gathered, at most ``max_headers + 1`` lines of a
    head are kept (one more than the limit tells a head past it) and trailing OWS is dropped
    from values, as ``RequestParser.on_header`` does."""
    if _PARSER is not None:
        return _PARSER(protocol, False, max_headers + 1, True)
    return httptools.HttpRequestParser(protocol)


def response_parser(protocol: object, max_headers: int) -> Any:
    """``protocol``'s llhttp for responses; values as received (as ``ResponseParser.on_header``)."""
    if _PARSER is not None:
        return _PARSER(protocol, True, max_headers + 1, False)
    return httptools.HttpResponseParser(protocol)
