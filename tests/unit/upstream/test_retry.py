"""Retry decisions: conditions, safety rules, backoff, Retry-After and the budget."""

from __future__ import annotations

import random
from dataclasses import replace
from email.utils import formatdate
from typing import Any

import pytest

from sidecar.config.retries import RetryBudgetConfig, RetryConfig
from sidecar.upstream.endpoint import Outcome, outcome_of_status
from sidecar.upstream.retry import RetryBudget, RetryPolicy, parse_http_date, parse_retry_after

NOW = 1000.0


def policy(rand: float | None = 0.5, **overrides: Any) -> RetryPolicy:
    # A budget that never runs out, unless the test is about the budget.
    overrides.setdefault("budget", RetryBudgetConfig(min_retries=10_000))
    config = replace(RetryConfig(attempts=2), **overrides)
    return RetryPolicy(config, rand=(lambda: rand) if rand is not None else None)


def decide(p: RetryPolicy, outcome: Outcome = Outcome.CONNECT_FAILURE, status: int | None = None,
           method: str = "GET", attempt: int = 1, **kw: object) -> tuple[bool, float, str]:
    args: dict[str, object] = {"body_replayable": True, "response_started": False, "now": NOW}
    args.update(kw)
    d = p.should_retry(attempt, outcome, status, method, **args)  # type: ignore[arg-type]
    return d.retry, d.backoff, d.reason


# --- what is retried ------------------------------------------------------------------


def test_default_conditions_connect_failure_reset_and_503() -> None:
    p = policy()
    assert decide(p, Outcome.CONNECT_FAILURE)[0]
    assert decide(p, Outcome.RESET)[0]
    assert decide(p, Outcome.GATEWAY_ERROR, 503)[0]
    assert decide(p, Outcome.GATEWAY_ERROR, 503)[2] == "503"
    assert decide(p, Outcome.GATEWAY_ERROR, 502) == (False, 0.0, "not_retriable")
    assert decide(p, Outcome.STATUS_5XX, 500)[2] == "not_retriable"
    assert decide(p, Outcome.TIMEOUT)[0]  # a per-try timeout is "no response": reset covers it
    assert decide(p, Outcome.SUCCESS, 200)[2] == "not_retriable"
    assert decide(p, Outcome.CANCELLED)[2] == "not_retriable"


def test_5xx_covers_every_upstream_failure() -> None:
    p = policy(on=frozenset({"5xx"}), on_statuses=frozenset())
    for outcome, status in [(Outcome.CONNECT_FAILURE, None), (Outcome.RESET, None),
                            (Outcome.TIMEOUT, None), (Outcome.STATUS_5XX, 500),
                            (Outcome.GATEWAY_ERROR, 504)]:
        assert decide(p, outcome, status)[0], outcome
    assert not decide(p, Outcome.SUCCESS, 404)[0]


def test_gateway_error_and_retriable_4xx_and_listed_codes() -> None:
    p = policy(on=frozenset({"gateway-error", "retriable-4xx"}), on_statuses=frozenset({429}))
    assert decide(p, Outcome.GATEWAY_ERROR, 502)[0]
    assert not decide(p, Outcome.STATUS_5XX, 500)[0]
    assert not decide(p, Outcome.CONNECT_FAILURE)[0]
    assert decide(p, Outcome.SUCCESS, 409)[0]
    assert decide(p, Outcome.SUCCESS, 429)[0]
    assert not decide(p, Outcome.SUCCESS, 400)[0]


def test_outcome_of_status() -> None:
    assert outcome_of_status(200) is Outcome.SUCCESS
    assert outcome_of_status(404) is Outcome.SUCCESS
    assert outcome_of_status(500) is Outcome.STATUS_5XX
    assert outcome_of_status(503) is Outcome.GATEWAY_ERROR


# --- safety rules ---------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"])
def test_idempotent_methods_are_retried(method: str) -> None:
    assert decide(policy(), method=method)[0]


@pytest.mark.parametrize("method", ["POST", "PATCH", "CONNECT"])
def test_non_idempotent_methods_are_not_retried_by_default(method: str) -> None:
    assert decide(policy(), Outcome.GATEWAY_ERROR, 503, method=method)[2] == "non_idempotent"
    assert decide(policy(retry_non_idempotent=True), Outcome.GATEWAY_ERROR, 503, method=method)[0]


def test_no_retry_after_the_response_started() -> None:
    assert decide(policy(), Outcome.RESET, response_started=True)[2] == "response_started"


def test_no_retry_when_the_body_was_too_large_to_keep() -> None:
    assert decide(policy(), body_replayable=False)[2] == "body_not_replayable"


def test_attempts_bound_the_retries() -> None:
    p = policy(attempts=2)
    assert decide(p, attempt=1)[0]
    assert decide(p, attempt=2)[0]
    assert decide(p, attempt=3)[2] == "attempts_exhausted"
    assert decide(policy(attempts=0), attempt=1)[2] == "attempts_exhausted"
    assert p.max_tries() == 3


def test_no_retry_that_cannot_start_before_the_deadline() -> None:
    p = policy(rand=1.0, backoff_base=0.1, backoff_max=0.1)
    assert decide(p, deadline=NOW + 0.2)[0]
    assert decide(p, deadline=NOW + 0.1)[2] == "deadline"


# --- backoff --------------------------------------------------------------------------


def test_backoff_ceiling_doubles_up_to_the_max() -> None:
    p = policy(rand=0.999999, backoff_base=0.025, backoff_max=0.250)
    ceilings = [p.backoff(n) for n in range(1, 8)]
    assert ceilings == pytest.approx([0.025, 0.05, 0.1, 0.2, 0.25, 0.25, 0.25], rel=1e-5)
    assert p.backoff(10_000) == pytest.approx(0.25, rel=1e-5)  # no overflow
    assert policy(rand=0.0).backoff(3) == 0.0


def test_full_jitter_spreads_over_the_whole_range() -> None:
    rng = random.Random(7)
    p = RetryPolicy(RetryConfig(backoff_base=0.1, backoff_max=1.0), rand=rng.random)
    draws = [p.backoff(3) for _ in range(10_000)]  # ceiling 0.4
    assert 0.0 <= min(draws) < 0.01
    assert 0.39 < max(draws) < 0.4
    assert sum(draws) / len(draws) == pytest.approx(0.2, abs=0.01)


def test_decision_carries_the_backoff() -> None:
    retry, backoff, _ = decide(policy(rand=0.5, backoff_base=0.1, backoff_max=1.0), attempt=2)
    assert retry and backoff == pytest.approx(0.1)  # half of the 0.2 ceiling


# --- Retry-After ----------------------------------------------------------------------


def test_retry_after_within_the_max_sets_the_backoff() -> None:
    p = policy(rand=0.5)
    retry, backoff, _ = decide(p, Outcome.GATEWAY_ERROR, 503, retry_after=2.0)
    assert retry and backoff == 2.0


def test_retry_after_beyond_the_max_means_no_retry() -> None:
    p = policy(max_retry_after=10.0)
    assert decide(p, Outcome.GATEWAY_ERROR, 503, retry_after=11.0)[2] == "retry_after_too_long"


def test_retry_after_ignored_when_not_honoured() -> None:
    p = policy(rand=0.0, honour_retry_after=False)
    assert decide(p, Outcome.GATEWAY_ERROR, 503, retry_after=60.0) == (True, 0.0, "503")


def test_parse_retry_after() -> None:
    wall = 1_700_000_000.0
    assert parse_retry_after(b"120", wall) == 120.0
    assert parse_retry_after(" 3 ", wall) == 3.0
    assert parse_retry_after(formatdate(wall + 30, usegmt=True).encode(), wall) == 30.0
    assert parse_retry_after(formatdate(wall - 30, usegmt=True), wall) == 0.0  # in the past
    assert parse_retry_after(b"9" * 5000, wall) == 1e9
    assert parse_retry_after(b"soon", wall) is None
    assert parse_retry_after(b"-5", wall) is None
    assert parse_retry_after(None, wall) is None


# RFC 9110 §5.6.7's example instant, 1994-11-06 08:49:37 UTC, in the three forms a recipient
# must accept; the two-digit year of the obsolete RFC 850 form is placed by the clock.
NOV_1994 = 784111777.0


@pytest.mark.parametrize("text", ["Sun, 06 Nov 1994 08:49:37 GMT", "Sunday, 06-Nov-94 08:49:37 GMT",
                                  "Sun Nov  6 08:49:37 1994", "  Sun, 06 Nov 1994 08:49:37 GMT "])
def test_an_http_date_is_read_in_each_of_its_three_forms(text: str) -> None:
    assert parse_http_date(text, 1_700_000_000.0) == NOV_1994


def test_a_two_digit_year_more_than_fifty_years_ahead_is_in_the_past_century() -> None:
    in_2026 = 1_790_000_000.0
    assert parse_http_date("Monday, 06-Nov-76 08:49:37 GMT", in_2026) == parse_http_date(
        "Sat, 06 Nov 2076 08:49:37 GMT", in_2026)  # 50 years ahead: still ahead
    assert parse_http_date("Tuesday, 06-Nov-77 08:49:37 GMT", in_2026) == parse_http_date(
        "Sun, 06 Nov 1977 08:49:37 GMT", in_2026)


@pytest.mark.parametrize("text", ["", "soon", "Sun, 06 Nov 1994 08:49:37 UTC", "Sun, 06 Foo 1994 08:49:37 GMT",
                                  "Sun, 31 Feb 1994 08:49:37 GMT", "Sun, 06 Nov 1994 25:49:37 GMT",
                                  "Sun, 06 Nov 1994 08:49 GMT", "Sunday, 06-Nov-1994 08:49:37",
                                  "Sun Nov  6 08:49:37", "Sun, 06 Nov 99999999999999999999 08:49:37 GMT",
                                  "06 Nov 1994 08:49:37 GMT +0000", "Sun, 06 Nov 94 08:49:37 GMT",
                                  "Sunday, 06-Nov-1994 08:49:37 GMT", "Sun Nov  6 08:49:37 94"])
def test_anything_else_is_not_a_date(text: str) -> None:
    assert parse_http_date(text, 1_700_000_000.0) is None


# --- budget ---------------------------------------------------------------------------


def test_budget_caps_retries_near_20_percent_under_total_failure() -> None:
    """Every try fails; the upstream must see at most ~1.2× the client's requests."""
    p = RetryPolicy(replace(RetryConfig(attempts=3), on=frozenset({"5xx"})),
                    rand=random.Random(1).random)
    now, requests, tries = NOW, 2000, 0
    for _ in range(requests):
        p.record_request(now)
        attempt = 1
        tries += 1
        while p.should_retry(attempt, Outcome.GATEWAY_ERROR, 503, "GET", body_replayable=True,
                             response_started=False, now=now).retry:
            attempt += 1
            tries += 1
        now += 0.01  # 100 requests a second: the 10 s window holds ~1000 requests
    assert tries <= 1.2 * requests + p.budget.min_retries
    assert tries >= 1.15 * requests  # and the budget is actually used, not starved
    assert p.budget.exhausted > 0


def test_budget_minimum_lets_a_quiet_service_retry() -> None:
    budget = RetryBudget(RetryBudgetConfig(percent=0.2, min_retries=3, window=10.0))
    budget.record_request(NOW)
    assert [budget.try_spend(NOW) for _ in range(4)] == [True, True, True, False]
    assert budget.snapshot(NOW) == {"requests": 1, "retries": 3, "percent": 0.2,
                                    "min_retries": 3, "exhausted": 1}
    assert budget.try_spend(NOW + 10.5)  # the window moved on


def test_a_retry_of_a_failure_isolated_to_one_endpoint_spends_no_budget() -> None:
    """One bad endpoint among good ones must not use up the budget that guards the service."""
    p = policy(budget=RetryBudgetConfig(percent=0.0, min_retries=1, window=10.0))
    p.record_request(NOW)
    for _ in range(50):
        assert decide(p, isolated=True)[0]
    assert p.budget.snapshot(NOW)["retries"] == 0
    assert decide(p)[0]  # the one retry the budget allows is still there
    assert decide(p)[2] == "budget_exhausted"
    # still bounded by attempts, isolated or not
    assert decide(p, attempt=3, isolated=True)[2] == "attempts_exhausted"


def test_exhausted_budget_refuses_and_a_refusal_spends_nothing() -> None:
    p = policy(budget=RetryBudgetConfig(percent=0.0, min_retries=1, window=10.0))
    assert decide(p)[0]
    assert decide(p)[2] == "budget_exhausted"
    # Refused for another reason first: the budget is not consulted.
    before = p.budget.exhausted
    assert decide(p, method="POST")[2] == "non_idempotent"
    assert p.budget.exhausted == before
