"""Retry decisions: whether a failed try is tried again, and after how long.

``RetryPolicy.should_retry`` looks at how the try ended, the method, whether the body can be
replayed and whether the response already reached the client, then at the attempts left, the
backoff (exponential, full jitter, or the upstream's ``Retry-After`` within a maximum), the
deadline, and last the ``RetryBudget``, so that only a retry that will happen spends budget.
The budget guards a service failing as a whole against a retry storm: the retry of a failure
isolated to one endpoint (``endpoint.isolated_failure``) goes to another endpoint that still
answers, amplifies nothing, and spends none (it is still bounded by ``attempts``).
Pure: no asyncio imports, no clock reads (``now`` comes in), randomness is injected.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from ..config.retries import RetryBudgetConfig, RetryConfig
from .circuit_breaker import RollingCounts
from .endpoint import Outcome

__all__ = [
    "IDEMPOTENT_METHODS",
    "RetryBudget",
    "RetryDecision",
    "RetryPolicy",
    "parse_http_date",
    "parse_retry_after",
    "retry_outcomes",
]

# RFC 9110 §9.2.2. A retry of anything else may do the thing twice.
IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})

_RETRIABLE_4XX: Final = 409  # Envoy's retriable-4xx: a conflict may resolve on its own


def retry_outcomes(names: frozenset[str]) -> frozenset[Outcome]:
    """``retries.on`` names -> the outcomes they retry (status codes are matched separately).
    As in Envoy, a per-try timeout counts as no response at all: ``reset`` (no response:
    disconnect, reset, read timeout), ``gateway-error`` and ``5xx`` retry it too; ``5xx`` also
    covers connect failures and any 5xx status."""
    table = {
        "connect-failure": (Outcome.CONNECT_FAILURE,),
        "reset": (Outcome.RESET, Outcome.TIMEOUT),
        "timeout": (Outcome.TIMEOUT,),
        "5xx": (Outcome.CONNECT_FAILURE, Outcome.RESET, Outcome.TIMEOUT,
                Outcome.STATUS_5XX, Outcome.GATEWAY_ERROR),
        "gateway-error": (Outcome.GATEWAY_ERROR, Outcome.TIMEOUT),
        "retriable-4xx": (),
    }
    return frozenset(o for name in names for o in table[name])


@dataclass(frozen=True, slots=True)
class RetryDecision:
    retry: bool
    backoff: float  # seconds to wait before the retry (0 when not retrying)
    reason: str  # why not (for the access log), or which condition matched


# The refusals are constants: most tries succeed, and a "no" must not allocate.
_NOT_RETRIABLE: Final = RetryDecision(False, 0.0, "not_retriable")
_RESPONSE_STARTED: Final = RetryDecision(False, 0.0, "response_started")
_EXHAUSTED: Final = RetryDecision(False, 0.0, "attempts_exhausted")
_NON_IDEMPOTENT: Final = RetryDecision(False, 0.0, "non_idempotent")
_BODY: Final = RetryDecision(False, 0.0, "body_not_replayable")
_RETRY_AFTER: Final = RetryDecision(False, 0.0, "retry_after_too_long")
_DEADLINE: Final = RetryDecision(False, 0.0, "deadline")
_BUDGET: Final = RetryDecision(False, 0.0, "budget_exhausted")


class RetryBudget:
    """Retries may be at most ``percent`` of the requests seen over the last ``window`` seconds,
    or ``min_retries`` per window, whichever is more (Finagle's and linkerd's budget).

    A share of *requests over time*, not of requests in flight: a concurrency share lets a
    client that sends one request at a time retry every one of them, which is exactly the
    retry storm this prevents. With 100% failures the upstream sees at most
    ``(1 + percent) × requests + min_retries`` tries per window. Memory is fixed (buckets).
    """

    __slots__ = ("config", "percent", "min_retries", "exhausted", "_counts")

    def __init__(self, config: RetryBudgetConfig, buckets: int = 10) -> None:
        self.config = config
        self.percent = config.percent
        self.min_retries = config.min_retries
        self.exhausted = 0  # retries refused, for metrics
        self._counts = RollingCounts(config.window, buckets)  # a: requests, b: retries

    def record_request(self, now: float) -> None:
        """A new downstream request (its first try; retries are not requests)."""
        self._counts.add(now, 1, 0)

    def try_spend(self, now: float) -> bool:
        """May one more retry go at ``now``? If so it is counted."""
        counts = self._counts
        counts.advance(now)
        if counts.b + 1 > max(self.min_retries, self.percent * counts.a):
            self.exhausted += 1
            return False
        counts.add(now, 0, 1)
        return True

    def snapshot(self, now: float) -> dict[str, object]:
        self._counts.advance(now)
        return {"requests": self._counts.a, "retries": self._counts.b,
                "percent": self.percent, "min_retries": self.min_retries,
                "exhausted": self.exhausted}


class RetryPolicy:
    """The retry rules of one service, with its budget. Built once per snapshot; pass the old
    policy's ``budget`` in when the budget config did not change, so a reload does not hand out
    a fresh allowance."""

    __slots__ = ("config", "budget", "_rand", "_outcomes", "_statuses", "_methods")

    def __init__(self, config: RetryConfig, *, rand: Callable[[], float] | None = None,
                 budget: RetryBudget | None = None) -> None:
        self.config = config
        self.budget = budget if budget is not None else RetryBudget(
            config.budget if config.budget is not None else RetryBudgetConfig())
        # A generator of its own: no shared global state, and tests inject a seeded one.
        self._rand = rand if rand is not None else random.Random().random
        self._outcomes = tuple(o in retry_outcomes(config.on) for o in Outcome)
        statuses = set(config.on_statuses)
        if "retriable-4xx" in config.on:
            statuses.add(_RETRIABLE_4XX)
        self._statuses = frozenset(statuses)
        self._methods = None if config.retry_non_idempotent else IDEMPOTENT_METHODS

    def record_request(self, now: float) -> None:
        """Call once per downstream request, before its first try: it feeds the budget."""
        self.budget.record_request(now)

    def max_tries(self) -> int:
        return self.config.attempts + 1

    def backoff(self, retry: int) -> float:
        """Full jitter: uniform in [0, min(max, base × 2^(retry-1))) for the ``retry``-th retry.
        Random spread keeps clients that failed together from retrying together."""
        cfg = self.config
        ceiling = min(cfg.backoff_max, cfg.backoff_base * (1 << min(max(retry - 1, 0), 30)))
        return self._rand() * ceiling

    def should_retry(self, attempt: int, outcome: Outcome, status: int | None, method: str, *,
                     body_replayable: bool, response_started: bool, now: float,
                     retry_after: float | None = None,
                     deadline: float | None = None, isolated: bool = False) -> RetryDecision:
        """After try number ``attempt`` (1 for the first) ended with ``outcome`` (and ``status``
        when a response head came), may the request be tried again, and after how long?

        ``body_replayable``: the whole request body is still held (no body, or one within
        ``max_replay_body``). ``response_started``: bytes of the response went downstream.
        ``retry_after``: the upstream's Retry-After in seconds (``parse_retry_after``).
        ``deadline``: when the route timeout fires; a retry that cannot start before it is not
        worth the budget. ``isolated``: the failure is its endpoint's alone (another endpoint in
        use still answers): the retry spends no budget.
        """
        if outcome is Outcome.CANCELLED:
            return _NOT_RETRIABLE  # nobody is waiting for the answer
        if not self._outcomes[outcome] and (status is None or status not in self._statuses):
            return _NOT_RETRIABLE
        if response_started:
            return _RESPONSE_STARTED
        cfg = self.config
        if attempt > cfg.attempts:
            return _EXHAUSTED
        if self._methods is not None and method not in self._methods:
            return _NON_IDEMPOTENT
        if not body_replayable:
            return _BODY
        backoff = self.backoff(attempt)
        if retry_after is not None and cfg.honour_retry_after:
            if retry_after > cfg.max_retry_after:
                return _RETRY_AFTER  # the upstream asked for more patience than we have
            backoff = max(backoff, retry_after)
        if deadline is not None and now + backoff >= deadline:
            return _DEADLINE
        if not isolated and not self.budget.try_spend(now):
            return _BUDGET
        listed = status is not None and status in self._statuses
        reason = str(status) if listed else outcome.name.lower()
        return RetryDecision(True, backoff, reason)


def parse_retry_after(value: bytes | str | None, wall_now: float) -> float | None:
    """``Retry-After`` in seconds from ``wall_now`` (``time.time()``, injected): delta-seconds
    (``120``) or an HTTP date. ``None`` when absent or unreadable."""
    if value is None:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    text = text.strip()
    if text.isdigit() and text.isascii():
        # A huge number is just "long": do not parse thousands of digits.
        return float(text) if len(text) <= 9 else 1e9
    when = parse_http_date(text, wall_now)
    return None if when is None else max(0.0, when - wall_now)


_MONTHS: Final = {name: number for number, name in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}


def parse_http_date(text: str, wall_now: float) -> float | None:
    """An HTTP date (RFC 9110 §5.6.7) as unix seconds, in any of the three forms a recipient
    must accept: ``Sun, 06 Nov 1994 08:49:37 GMT``, ``Sunday, 06-Nov-94 08:49:37 GMT`` and
    ``Sun Nov  6 08:49:37 1994``; None for anything else. Not ``email.utils``: it would add
    ~0.6 MB of modules (``email``, ``calendar``, ``quopri``...) to every sidecar for a header
    few upstreams send as a date. ``wall_now`` places a two-digit year."""
    parts = text.split()
    try:
        if len(parts) == 6 and parts[5] == "GMT" and parts[0].endswith(","):  # IMF-fixdate
            day, month, full, clock = parts[1], parts[2], parts[3], parts[4]
            year = int(full) if len(full) == 4 else -1
        elif len(parts) == 4 and parts[3] == "GMT" and parts[0].endswith(","):  # RFC 850
            day, month, short = parts[1].split("-")
            if len(short) != 2:
                return None
            # §5.6.7: a two-digit year that looks more than 50 years ahead is in the past
            this_year = datetime.fromtimestamp(wall_now, UTC).year
            year = this_year - this_year % 100 + int(short)
            if year > this_year + 50:
                year -= 100
            clock = parts[2]
        elif len(parts) == 5:  # asctime
            month, day, clock, full = parts[1], parts[2], parts[3], parts[4]
            year = int(full) if len(full) == 4 else -1
        else:
            return None
        hour, minute, second = clock.split(":")
        # (a year of another length than its form's is not a date: datetime refuses -1)
        return datetime(year, _MONTHS[month], int(day), int(hour), int(minute), int(second),
                        tzinfo=UTC).timestamp()
    except (KeyError, ValueError, OverflowError):
        return None
