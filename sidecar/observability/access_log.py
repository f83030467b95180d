"""One JSON line per exchange: who asked what, what happened, and why (the flag and reason).

On the hot path, so the line is one f-string: compiled, that is a single allocation and copy
of its pieces (mypyc's string build), where ``%`` with a template parsed the template, boxed
each value and formatted the duration as a float on every call (19.6k against 10.2k
instructions a line, callgrind). Strings are quoted as ``json.dumps`` quotes them
(``json_text``), those that repeat (route, cluster, authority...) once per value; the
timestamp is formatted once per second, and the wall clock read only then: the exchange's end
on the monotonic clock (which the pipeline read for the duration) says when the second is
over. Numbers below 1000 come from a table and a request id is quoted only when it holds a
quote or a backslash (``json_text``): with the clock, 8.9k → 5.7k instructions a line. The
string build itself costs ~75 instructions a piece it joins, so what repeats comes as whole
fragments, key and value (the stamp with the line's opening, the cached fields, the common
values of the numbers, the trace ids when off): 41 pieces → 28. Who asked and where it went
(listener, authority, route, cluster, upstream, client, peer, principal) is one fragment kept
while it stays the same, as it does along a connection: 28 → 19. The opening with the method,
the flags with the keys around them, the status with the path's closing quote: 19 → 15. The
line goes on the log's channel (``log_writer``): no I/O on the loop, dropped and counted when
the output cannot keep up.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..config.model import RouteConfig
from ..exchange import Exchange
from .json_text import (DECIMALS, MAX_CACHED, NumberField, QuoteCache, int_text, path_text, quote,
                        request_id_text, trace_ids)
from .log_writer import LogChannel

__all__ = ["AccessLog"]

# Left unquoted: values that cannot hold a quote or a backslash (the listener's and the flags'
# fixed names, a method the parser took from its fixed list, an IP address from the socket);
# trace and span ids are hex we made or checked (``tracing``), quoted here, or null when off.


class AccessLog:
    def __init__(self, channel: LogChannel, *, wall: Callable[[], float] = time.time) -> None:
        self.channel = channel
        self.wall = wall
        self._until = float("-inf")  # monotonic time at which the stamp in ``_opening`` is over
        self._opening = ""  # the line up to the method's value: its stamp changes once a second
        self._start = ""  # and up to the path's value, for the method ``_start_method``
        self._start_method = ""
        self._flags_text = ',"flags":"-","request_id":"'  # the flags' field and the next key, for ``_flags``
        self._flags = "-"
        # values that repeat from line to line, as whole ``,"key":"value"`` fragments
        self._authority = QuoteCache(prefix=',"authority":')
        self._route = QuoteCache(prefix=',"route":')
        self._cluster = QuoteCache(prefix=',"cluster":')
        self._upstream = QuoteCache(prefix=',"upstream":')
        # numbers as whole fragments, from tables of their common values (~75 KB in all)
        self._status = NumberField("status", 600, lead='"')  # (after the path's closing quote)
        self._bytes_in = NumberField("bytes_in", 256)
        self._bytes_out = NumberField("bytes_out", 256)
        self._duration = NumberField("duration_ms", 100)
        self._attempts = NumberField("attempts", 16)
        self._peer = QuoteCache(prefix=',"peer":')  # the optional fields
        self._principal = QuoteCache(prefix=',"principal":')
        self._tags: dict[str, QuoteCache] = {}  # by tag name (a filter's fixed names: few)
        # Who asked and where it went: the fields that stay the same from one exchange to the
        # next on a connection, and across one client's connections. One fragment, made again
        # when one of them changes: eight compares where the look-ups of their caches and
        # their pieces of the build cost ~1.2k instructions a line (callgrind).
        self._who = ""
        self._listener = ""
        self._authority_of = ""
        self._route_of: RouteConfig | None = None
        self._cluster_of = ""
        self._upstream_of = ""
        self._client = ""
        self._peer_of: str | None = None
        self._principal_of: str | None = None
        # the tags of the last line that had any (a copy), and their fragment: a policy's
        # filters tag every exchange alike (``rbac``, ``rbac_rule``), and one compare of the
        # dicts costs less than a fragment made of them (~0.8k instructions, callgrind)
        self._last_tags: dict[str, str] = {}
        self._last_tags_of: dict[str, str] = {}  # the dict itself those tags came in
        self._tags_text = ""

    def log(self, ex: Exchange, duration: float) -> None:
        ended = ex.start + duration  # monotonic, as the pipeline measured the duration
        if ended >= self._until:
            now = self.wall()
            second = int(now)
            self._until = ended + (second + 1 - now)
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))
            self._opening = f'{{"event":"access","timestamp":"{stamp}","method":"'
            self._start_method = ""  # (its start made again below)
        head = ex.request
        method = head.method
        if method is not self._start_method:
            self._start_method = method
            self._start = f'{self._opening}{method}","path":"'
        flags = ex.flags
        if flags is not self._flags:
            self._flags = flags
            self._flags_text = f',"flags":"{flags}","request_id":"'
        route = ex.route
        micros = int(duration * 1_000_000)  # to the microsecond, truncated
        if (ex.listener == self._listener and head.authority == self._authority_of
                and route is self._route_of and ex.cluster == self._cluster_of
                and ex.upstream == self._upstream_of and ex.downstream_address == self._client
                and ex.peer_identity == self._peer_of and ex.principal == self._principal_of):
            who = self._who
        else:
            who = self._who_changed(ex, head.authority, route)
        optional = ""  # the fields set only on some exchanges; most have none
        tags = ex.tags
        if tags:
            # a filter's shared tags (``Exchange.share_tags``) are known by identity
            optional = (self._tags_text if tags is self._last_tags_of or tags == self._last_tags
                        else self._tags_changed(tags))
        if ex.reason:
            optional = ',"reason":' + quote(ex.reason) + optional
        self.channel.put(
            f'{self._start}{path_text(ex)}{self._status.text(ex.status)}'
            f'{self._bytes_in.text(ex.bytes_in)}{self._bytes_out.text(ex.bytes_out)}'
            f'{self._duration.text(micros // 1000)}{DECIMALS[micros % 1000]}{self._attempts.text(ex.attempts)}'
            f'{self._flags_text}{request_id_text(ex)}"'
            f'{trace_ids(ex.trace_id, ex.span_id)}{who}{optional}}}\n')

    def _tags_changed(self, tags: dict[str, str]) -> str:
        parts: list[str] = []
        for key, value in tags.items():
            tag = self._tags.get(key)
            if tag is None:
                if len(self._tags) >= MAX_CACHED:
                    self._tags.clear()
                tag = self._tags[key] = QuoteCache(prefix="," + quote(key) + ":")
            parts.append(tag.get(value))
        self._last_tags = dict(tags)
        self._last_tags_of = tags
        text = self._tags_text = "".join(parts)
        return text

    def _who_changed(self, ex: Exchange, authority: str, route: RouteConfig | None) -> str:
        self._listener = ex.listener
        self._authority_of = authority
        self._route_of = route
        self._cluster_of = ex.cluster
        self._upstream_of = ex.upstream
        self._client = ex.downstream_address
        self._peer_of = peer = ex.peer_identity
        self._principal_of = principal = ex.principal
        route_field = self._route.get(route.name) if route is not None else ',"route":"-"'
        who = (f',"listener":"{ex.listener}"{self._authority.get(authority)}{route_field}'
               f'{self._cluster.get(ex.cluster)}{self._upstream.get(ex.upstream)},"client":"{ex.downstream_address}"')
        if peer:
            who += self._peer.get(peer)
        if principal:
            who += self._principal.get(principal)
        self._who = who
        return who
