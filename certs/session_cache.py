"""Client-side TLS session resumption, per upstream address, bounded.

asyncio's `loop.create_connection(ssl=...)` has no `session=` argument, but
it only ever calls `ctx.wrap_bio(...)`; `ResumingContext` wraps the current
client context and passes a cached session there. It works with the asyncio
and uvloop create_connection paths; `loop.start_tls` insists on a real
SSLContext, so use the plain context there (no resumption).

Safety: a session is only offered with the very context object it was made
with. After a reload (new bundle, new certificate) old sessions are never
resumed, so a removed root cannot keep authenticating through a ticket.
"""

from __future__ import annotations

import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

__all__ = ["ResumingContext", "SessionCache"]


@dataclass(frozen=True, slots=True)
class _Entry:
    context: ssl.SSLContext
    session: ssl.SSLSession


class ResumingContext:
    """Looks like the wrapped SSLContext, but offers `session` on wrap_bio."""

    def __init__(self, context: ssl.SSLContext, session: ssl.SSLSession) -> None:
        self.context = context
        self.session = session

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        return self.context.wrap_bio(
            incoming,
            outgoing,
            server_side=server_side,
            server_hostname=server_hostname,
            session=session or self.session,
        )

    def __getattr__(self, name: str) -> Any:
        # Everything else (check_hostname, verify_mode...) is the real context's.
        return getattr(self.context, name)


class SessionCache:
    """The last resumable session per upstream address, LRU-bounded.

    Use: `ctx = cache.context_for(address, source.client())` before
    connecting, and `cache.store(address, ctx, ssl_object.session)` once
    the connection has read a response (TLS 1.3 tickets arrive after the
    handshake) or when it is released.
    """

    def __init__(
        self, maxsize: int = 256, *, clock: Callable[[], float] = time.time
    ) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self.maxsize = maxsize
        self._clock = clock  # wall clock: SSLSession.time is in epoch seconds
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def context_for(
        self, address: Hashable, context: ssl.SSLContext
    ) -> ssl.SSLContext | ResumingContext:
        """`context`, or a ResumingContext if a live session for address exists."""
        entry = self._entries.get(address)
        if entry is None:
            return context
        if entry.context is not context or self._expired(entry.session):
            del self._entries[address]
            return context
        self._entries.move_to_end(address)
        return ResumingContext(context, entry.session)

    def store(
        self,
        address: Hashable,
        context: ssl.SSLContext | ResumingContext,
        session: ssl.SSLSession | None,
    ) -> None:
        """Remember a connection's session (`ssl_object.session`) for address.

        `context` is the one the connection was made with (as returned by
        context_for); sessions without a ticket or id are not resumable and
        are ignored.
        """
        if session is None or (not session.has_ticket and not session.id):
            return
        real = context.context if isinstance(context, ResumingContext) else context
        self._entries[address] = _Entry(real, session)
        self._entries.move_to_end(address)
        if len(self._entries) > self.maxsize:
            self._entries.popitem(last=False)

    def holds(self, address: Hashable, context: ssl.SSLContext) -> bool:
        """A live session for address, made with ``context``, is cached (and offered)."""
        entry = self._entries.get(address)
        return entry is not None and entry.context is context and not self._expired(entry.session)

    def forget(self, address: Hashable) -> None:
        """Drop an address's session, e.g. after a failed resumption or handshake."""
        self._entries.pop(address, None)

    def _expired(self, session: ssl.SSLSession) -> bool:
        return self._clock() >= session.time + session.timeout
