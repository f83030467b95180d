"""The audit log: one structured JSON record per authentication or authorization decision.

Rules: a filter calls ``record()`` exactly once per decision it makes (allow, deny, or a
dry-run ``would_deny``), or ``record_request()`` when the reason is ``request_reason``'s (the
request and its caller: RBAC's). Neither blocks nor does I/O: the JSON line is one f-string
(compiled, one allocation), put on the audit's log channel (``log_writer``: a bounded queue
and the output's writer thread). When the queue is full the record is dropped and counted
(``dropped``, read by metrics) and a warning is logged at most once per ``warn_interval``;
every record is written while the writer keeps up. The output is stdout (shared with the
process's other logs, one writer for all) or a file rotated by size
keeping ``keep`` old files. Each record has ``"event": "audit"``, so on stdout it can be
told from the process's other JSON log lines (``"event": "access"``, ``"ready"``...).
Records carry no credentials: no tokens, no keys, no claims beyond the principal.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Final, Literal, Protocol

import structlog

from .clock import Clock, MonotonicClock
from .config.audit import AuditConfig
from .exchange import Exchange
from .observability.json_text import DECIMALS, QuoteCache, path_text, quote, request_id_text, trace_ids
from .observability.log_writer import LogChannel, LogOutputs, encoded_chunks

__all__ = [
    "AuditLog",
    "AuditRecorder",
    "Decision",
    "MAX_REASON_PATH",
    "RotatingFileSink",
    "Stage",
    "build_audit_log",
    "request_reason",
]

log = structlog.get_logger("pake.audit")

Stage = Literal["authn", "authz"]
Decision = Literal["allow", "deny", "would_deny"]
_MAX_CHARS: Final = 8 << 20  # queued audit lines, in characters (the config bounds them in records)


class AuditRecorder(Protocol):
    """What filters need: ``AuditLog`` in the sidecar, a list-backed fake in tests."""

    def record(self, exchange: Exchange, stage: Stage, decision: Decision, rule: str,
               reason: str) -> None: ...

    def record_request(self, exchange: Exchange, stage: Stage, decision: Decision, rule: str,
                       start: str) -> None:
        """``record`` with ``request_reason(start, exchange)`` as the reason."""


MAX_REASON_PATH: Final = 200  # characters of a path a reason shows (a reply carries it too)


def request_reason(start: str, exchange: Exchange) -> str:
    """``<start>GET /path from <who>``: a decision's reason that names the request and who
    made it; ``who`` is the peer's SPIFFE ID (mTLS) or ``client <address>``, with
    `` as <principal>`` when a JWT or an API key named someone else. The one place this text
    is made: ``AuditLog.record_request`` writes the same text straight into a record."""
    request = exchange.request
    peer = exchange.peer_identity
    who = peer or f"client {exchange.downstream_address}"
    principal = exchange.principal
    if principal and principal != peer:
        who += f" as {principal}"
    return f"{start}{request.method} {request.path[:MAX_REASON_PATH]} from {who}"


class RotatingFileSink:
    """Appends to ``path``; past ``max_size`` bytes renames it ``path.1`` (and ``path.1`` to
    ``path.2``... up to ``keep``, the oldest deleted) and starts a new file."""

    def __init__(self, path: Path, *, max_size: int, keep: int) -> None:
        self.path = path
        self.max_size = max_size
        self.keep = keep
        self._file = self._open()

    def _open(self) -> BinaryIO:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # 0o600: the audit log says who called what; not for every local user to read.
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        # a device or a pipe (/dev/null, a FIFO to a shipper) is written, never rotated: renaming
        # it would move the device node itself, and the next open would make a regular file
        self._rotates = stat.S_ISREG(os.fstat(fd).st_mode)
        f = os.fdopen(fd, "ab")
        self._size = f.tell()
        return f

    def _rotate(self) -> None:
        self._file.close()
        if self.keep == 0:
            self.path.unlink(missing_ok=True)
        else:
            for i in range(self.keep - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{i}")
                if older.exists():
                    older.replace(self.path.with_name(f"{self.path.name}.{i + 1}"))
            self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        self._file = self._open()

    def write(self, lines: list[str]) -> None:
        # A piece of the batch that fits is encoded and written whole (``encoded_chunks``):
        # line by line, an encode and a buffered write each cost the writer thread ~650
        # instructions a record (callgrind). One that would pass ``max_size`` goes line by
        # line, to rotate between the same lines.
        for piece, data in encoded_chunks(lines):
            if not self._rotates or self._size + len(data) <= self.max_size:
                self._file.write(data)
                self._size += len(data)
                continue
            for line in piece:
                encoded = line.encode("utf-8", "backslashreplace")
                if self._size and self._size + len(encoded) > self.max_size:
                    self._rotate()
                self._file.write(encoded)
                self._size += len(encoded)
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class AuditLog:
    """Encodes each decision as one JSON line and puts it on the audit's log channel."""

    def __init__(self, channel: LogChannel, *, warn_interval: float = 10.0,
                 clock: Clock | None = None, wall: Callable[[], float] = time.time) -> None:
        self.channel = channel
        self.warn_interval = warn_interval
        self.clock = clock or MonotonicClock()
        self.wall = wall
        self._last_warning = float("-inf")
        self._second = -1
        self._opening = ""  # the line up to its time's milliseconds: its stamp changes once a second
        self._repeated = QuoteCache()  # the peer, principal, service and rule repeat
        self._starts = QuoteCache()  # a reason's start: a rule's, per decision it makes
        # The fields that repeat from record to record (who asked, the service, the stage, the
        # decision and its rule): one fragment (``_same``), made again when one of them changes.
        # Seven compares where two look-ups and 14 pieces of the build cost ~1k instructions.
        self._same = ""
        self._same_source = ""
        self._same_client = ""
        self._same_principal = ""
        self._same_service = ""
        self._same_stage: Stage = "authz"
        self._same_decision: Decision = "allow"
        self._same_rule = ""
        self._same_method = ""
        # ``record_request``'s: the last record's caller (peer, principal, client), their
        # quoted fields and the reason's end (`` from <who>"``); the reason's start (the
        # rule's, then the method)
        self._caller_peer: str | None = None
        self._caller_principal: str | None = None
        self._caller_client = ""
        self._caller_source = "null"
        self._caller_principal_text = "null"
        self._who_tail = ' from client "}\n'
        self._start_of = ""
        self._method_of = ""
        self._reason_start = '","reason":" '

    # Read by metrics (pake_audit_records): the channel counts them.
    @property
    def dropped(self) -> int:
        return self.channel.dropped

    @property
    def written(self) -> int:
        return self.channel.written

    @property
    def write_errors(self) -> int:
        return self.channel.write_errors

    # --- hot path --------------------------------------------------------------------
    def record(self, exchange: Exchange, stage: Stage, decision: Decision, rule: str,
               reason: str) -> None:
        repeated = self._repeated
        self._put(exchange, stage, decision, rule, repeated.get_or_null(exchange.peer_identity),
                  repeated.get_or_null(exchange.principal), '","reason":' + quote(reason), "", "}\n")

    def record_request(self, exchange: Exchange, stage: Stage, decision: Decision, rule: str,
                       start: str) -> None:
        # ``request_reason``'s text, put together from pieces quoted already: JSON escapes
        # character by character, so the quoted pieces joined are the quoted whole. Quoting
        # the whole reason again cost ~1.6k instructions a record, and building it ~0.9k
        # (callgrind, an RBAC allow); the path, the peer and the principal are quoted for
        # their own fields anyway. Its start (the rule's, the method) and its end (who asked)
        # repeat, as they do along a connection: each is made again only when it changes.
        request = exchange.request
        peer = exchange.peer_identity
        principal = exchange.principal
        client = exchange.downstream_address
        if peer != self._caller_peer or principal != self._caller_principal or client != self._caller_client:
            self._caller_changed(peer, principal, client)
        if start != self._start_of or request.method != self._method_of:
            self._start_of = start
            self._method_of = request.method
            self._reason_start = f'","reason":{self._starts.get(start)[:-1]}{request.method} '
        shown = (path_text(exchange) if len(request.path) <= MAX_REASON_PATH
                 else quote(request.path[:MAX_REASON_PATH])[1:-1])
        # the reason's three pieces go into the line's own build: one string made, not two
        self._put(exchange, stage, decision, rule, self._caller_source, self._caller_principal_text,
                  self._reason_start, shown, self._who_tail)

    def _caller_changed(self, peer: str | None, principal: str | None, client: str) -> None:
        repeated = self._repeated
        self._caller_peer = peer
        self._caller_principal = principal
        self._caller_client = client
        source = self._caller_source = repeated.get_or_null(peer)
        principal_text = self._caller_principal_text = repeated.get_or_null(principal)
        who = source[1:-1] if peer else "client " + client
        if principal and principal != peer:
            who = who + " as " + principal_text[1:-1]
        self._who_tail = f' from {who}"}}\n'

    def _put(self, exchange: Exchange, stage: Stage, decision: Decision, rule: str, source: str,
             principal: str, reason: str, reason_more: str, reason_end: str) -> None:
        """The record's line, from its fields quoted (``source``, ``principal``: JSON
        literals; the reason a JSON literal in three pieces, joined as they are, the first
        after the path's closing quote and the reason's key, the last with the line's end:
        the line is one string build, ~90 instructions a piece, and what repeats comes as
        whole fragments, the stamp with the line's opening, the method with the fields that
        repeat, the punctuation with the reason's pieces kept: 17 pieces → 11)."""
        now = self.wall()
        second = int(now)
        if second != self._second:
            self._second = second
            self._opening = '{"event":"audit","time":"' + time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        # method, stage and decision come from fixed lists, trace and span ids are hex we made
        # or checked (``tracing``), the client an address from the socket: never quoted
        method = exchange.request.method
        if (source == self._same_source and exchange.downstream_address == self._same_client
                and principal == self._same_principal and exchange.service == self._same_service
                and stage == self._same_stage and decision == self._same_decision and rule == self._same_rule
                and method is self._same_method):
            same = self._same
        else:
            self._same_source = source
            self._same_client = exchange.downstream_address
            self._same_principal = principal
            self._same_service = exchange.service
            self._same_stage = stage
            self._same_decision = decision
            self._same_rule = rule
            self._same_method = method
            same = self._same = (
                f',"source":{source},"client":"{exchange.downstream_address}","principal":{principal},'
                f'"service":{self._repeated.get(exchange.service)},"stage":"{stage}","decision":"{decision}",'
                f'"rule":{self._repeated.get(rule)},"method":"{method}","path":"')
        line = (f'{self._opening}{DECIMALS[min(int((now - second) * 1000), 999)]}Z",'
                f'"request_id":"{request_id_text(exchange)}"{trace_ids(exchange.trace_id, exchange.span_id)}'
                f'{same}{path_text(exchange)}{reason}{reason_more}{reason_end}')
        if not self.channel.put(line):
            now = self.clock.monotonic()
            if now - self._last_warning >= self.warn_interval:
                self._last_warning = now
                log.warning("audit_records_dropped", dropped=self.channel.dropped,
                            queue=self.channel.max_lines)


def build_audit_log(config: AuditConfig, outputs: LogOutputs, *, clock: Clock | None = None,
                    base_dir: Path | None = None) -> AuditLog:
    """The audit log on its output: stdout (shared) or its own rotating file."""
    if config.path == "stdout":
        writer = outputs.output("stdout")
    else:
        path = Path(config.path)
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        writer = outputs.output(path, lambda: RotatingFileSink(path, max_size=config.max_size,
                                                                keep=config.keep))
    channel = writer.channel("audit", max_lines=config.queue, max_chars=_MAX_CHARS)
    return AuditLog(channel, warn_interval=config.warn_interval, clock=clock)
