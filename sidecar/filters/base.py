"""The filter interface: each stage of the request path passes the exchange on or answers it.

A filter is built once per snapshot from its config (``FooFilterConfig`` work such as
compiling matchers and loading keys happens at build time) and then called once per
exchange: ``on_request`` returns ``None`` to continue or a ``LocalReply`` to answer now.
Filters are synchronous and must not block: anything slow (fetching keys) happens in the
background and the filter reads its result. A filter that needs the body declares
``max_body`` and gets ``on_body`` with the whole body (at most that many bytes).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from ..errors import LocalReply
from ..exchange import Exchange

__all__ = ["BodyFilter", "Filter", "FilterChain"]


@runtime_checkable
class Filter(Protocol):
    name: str

    def on_request(self, exchange: Exchange) -> LocalReply | None:
        """``None``: continue with the next filter. A ``LocalReply``: answer with it."""
        ...


@runtime_checkable
class BodyFilter(Filter, Protocol):
    max_body: int  # the body is buffered up to this; a larger one is refused with 413

    def wants_body(self, exchange: Exchange) -> bool: ...
    def on_body(self, exchange: Exchange, body: bytes) -> LocalReply | None: ...


FilterChain = tuple[Filter, ...]
