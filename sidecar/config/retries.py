"""Config of retries: which failures are retried, how often, with what backoff, within what budget.
Set per service, and overridable per route (a route's ``retries`` section has the same shape).

Frozen slotted dataclasses and ``parse_*(node: Fields)``: bad values are reported with their
full path, unknown keys through ``Fields``. Defaults live here and nowhere else. Pure: no I/O.
The YAML shape; the values shown are the defaults, except where a comment says optional or e.g.::

    services:
      orders:
        retries:
          attempts: 1                  # retries after the first try, 0..10 (0: never retry)
          on: [connect-failure, reset, "503"]
                                       # connect-failure | reset | timeout | 5xx | gateway-error
                                       # | retriable-4xx (409) | a status code 400..599
          per_try_timeout: 500ms       # optional; unset: a try may use what the route leaves
          backoff: {base: 25ms, max: 250ms}   # full jitter: uniform(0, min(max, base·2^(retry-1)))
          budget: 20%                  # or {percent: 20%, min_retries: 3, window: 10s}: retries are
                                       # at most percent of the requests seen in the window (or
                                       # min_retries): a failing upstream never sees a retry storm.
                                       # A retry of a failure isolated to one endpoint, sent to
                                       # another that answers, spends none. On a route: that
                                       # route's own budget; unset, the route shares the service's
          retry_non_idempotent: false  # true: POST, PATCH, CONNECT are retried too
          max_replay_body: 64KiB       # a larger request body is streamed, not kept: never retried
          honour_retry_after: true     # a 429/503 Retry-After sets the backoff ...
          max_retry_after: 10s         # ... unless it asks for longer than this: then no retry
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from .reader import Fields
from .values import bounded_size, secs, status_code

MAX_REPLAY_BODY: Final = 16 * 1024 * 1024  # the largest max_replay_body a route may set

__all__ = ["RETRY_CONDITIONS", "RetryBudgetConfig", "RetryConfig", "parse_retries"]

RETRY_CONDITIONS: Final = ("connect-failure", "reset", "timeout", "5xx", "gateway-error", "retriable-4xx")


@dataclass(frozen=True, slots=True)
class RetryBudgetConfig:
    percent: float = 0.2  # retries ≤ percent × requests in the window ...
    min_retries: int = 3  # ... or this many, whichever is more, so a quiet service can retry
    window: float = 10.0


@dataclass(frozen=True, slots=True)
class RetryConfig:
    attempts: int = 1  # retries, not counting the first try: a request is tried attempts+1 times
    on: frozenset[str] = frozenset({"connect-failure", "reset"})  # names from RETRY_CONDITIONS
    on_statuses: frozenset[int] = frozenset({503})
    per_try_timeout: float | None = None
    backoff_base: float = 0.025
    backoff_max: float = 0.250
    # None: not set. A service then has the default budget, and a route with its own retries
    # section shares its service's; a route that sets one has budget state of its own.
    budget: RetryBudgetConfig | None = None
    retry_non_idempotent: bool = False
    max_replay_body: int = 64 * 1024
    honour_retry_after: bool = True
    max_retry_after: float = 10.0


def parse_retries(node: Fields) -> RetryConfig:
    d = RetryConfig()
    attempts = node.int("attempts", d.attempts, min=0, max=10)
    on, on_statuses = d.on, d.on_statuses
    if node.has("on"):
        names, statuses = set(), set()
        for path, item in node.list("on"):
            status = status_code(item, 400)
            if status is not None:
                statuses.add(status)
            elif isinstance(item, str) and item in RETRY_CONDITIONS:
                names.add(item)
            else:
                node.problems.add(path, f"must be one of {', '.join(RETRY_CONDITIONS)} or a status "
                                        f"code like \"503\", got {item!r}")
        on, on_statuses = frozenset(names), frozenset(statuses)
    per_try_timeout = node.duration("per_try_timeout", None, min=0.001)
    backoff = node.sub("backoff")
    base = backoff.duration("base", d.backoff_base)
    bmax = backoff.duration("max", d.backoff_max)
    if bmax < base:
        backoff.error("max", f"must be ≥ base ({secs(base)}), got {backoff.data['max']!r}")
        bmax = base
    backoff.done()
    config = RetryConfig(
        attempts=attempts,
        on=on,
        on_statuses=on_statuses,
        per_try_timeout=per_try_timeout,
        backoff_base=base,
        backoff_max=bmax,
        budget=_retry_budget(node),
        retry_non_idempotent=node.bool("retry_non_idempotent", d.retry_non_idempotent),
        max_replay_body=bounded_size(node, "max_replay_body", d.max_replay_body, MAX_REPLAY_BODY),
        honour_retry_after=node.bool("honour_retry_after", d.honour_retry_after),
        max_retry_after=node.duration("max_retry_after", d.max_retry_after),
    )
    node.done()
    return config


def _retry_budget(node: Fields) -> RetryBudgetConfig | None:
    d = RetryBudgetConfig()
    value = node.data.get("budget")
    if value is None:
        if node.has("budget"):
            node.raw("budget")  # ``budget: null`` is "not set"
        return None
    if value is not None and not isinstance(value, dict):  # the short form, ``budget: 20%``
        return RetryBudgetConfig(percent=node.percent("budget", d.percent))
    sub = node.sub("budget")
    budget = RetryBudgetConfig(
        percent=sub.percent("percent", d.percent),
        min_retries=sub.int("min_retries", d.min_retries, min=0, max=10_000),
        window=sub.duration("window", d.window, min=0.1),
    )
    sub.done()
    return budget
