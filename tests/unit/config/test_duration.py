"""One duration grammar for the config, the CLI and the fault headers (sidecar.config.reader).

Each form a person writes is accepted the same way wherever a duration is read, and every
refusal says what a duration looks like and shows the value it got.
"""

from __future__ import annotations

import argparse
from datetime import timedelta
from typing import Any

import pytest

from control.cli import parse_duration as cli_duration
from sidecar.config.reader import Fields, Problems, format_duration, parse_duration

FORMS = [
    ("500ms", 0.5),
    ("2s", 2.0),
    ("1.5s", 1.5),
    ("10m", 600.0),
    ("24h", 86400.0),
    ("7d", 604800.0),
    ("1h30m", 5400.0),
    ("1m30s", 90.0),
    ("1s250ms", 1.25),
    ("1d12h", 129600.0),
    ("0.5ms", 0.0005),
    ("0s", 0.0),
]

REFUSED: list[Any] = [
    "10",        # a bare number: seconds or milliseconds? the classic config bug
    "",
    "s",
    "1y",
    "1H",
    " 1s",
    "1s ",
    "1h 30m",
    "30m1h",     # largest unit first
    "1m1m",      # each unit once
    ".5s",
    "1.s",
    "-1s",
    "1,5s",
    10,
    1.5,
    True,
    None,
    ["1s"],
]


@pytest.mark.parametrize(("text", "seconds"), FORMS)
def test_every_form_is_read_the_same_in_config_and_cli(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)
    problems = Problems()
    node = Fields({"timeout": text}, "services.orders.timeouts", problems)
    assert node.duration("timeout") == pytest.approx(seconds)
    assert problems.items == []
    if seconds > 0:
        assert cli_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("value", REFUSED)
def test_refusals_say_what_a_duration_looks_like(value: Any) -> None:
    with pytest.raises(ValueError) as caught:
        parse_duration(value)
    assert str(caught.value) == f"must be a duration like 500ms or 1h30m, got {value!r}"


def test_config_error_names_the_path_and_the_value() -> None:
    problems = Problems()
    node = Fields({"route": "1h 30m"}, "services.orders.timeouts", problems)
    assert node.duration("route", 15.0) == 15.0
    assert problems.items == [
        "services.orders.timeouts.route: must be a duration like 500ms or 1h30m, got '1h 30m'"]


def test_cli_refuses_zero_and_says_why() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="must be a positive duration, got '0s'"):
        cli_duration("0s")
    with pytest.raises(argparse.ArgumentTypeError, match="must be a duration like 500ms or 1h30m"):
        cli_duration("24")


@pytest.mark.parametrize(("seconds", "text"), [
    (0.0, "0s"), (0.1, "100ms"), (0.5, "500ms"), (1.5, "1500ms"), (61.0, "61s"),
    (5400.0, "90m"), (86400.0, "1d"), (0.0005, "0.5ms"),
])
def test_format_duration_reads_back(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == pytest.approx(seconds)
