"""The ``slo`` section: defaults, path-qualified errors, unknown keys; through parse_mesh."""

from __future__ import annotations

import pytest

from sidecar.config.load import parse_mesh
from sidecar.config.reader import ConfigError
from sidecar.config.slo import SloConfig


def slo_of(section: object) -> list[str]:
    try:
        parse_mesh({"services": {"orders": {"slo": section}}})
    except ConfigError as exc:
        return exc.problems
    return []


def test_a_valid_section_is_accepted() -> None:
    assert slo_of({"window": "30m", "availability": "99.9%", "error_rate": "0.1%", "p95": "500ms",
                   "breaker_activation": "1%", "min_requests": 50}) == []
    assert SloConfig(availability=0.999, error_rate=0.01).allowed_error_ratio == pytest.approx(0.001)


@pytest.mark.parametrize(("section", "problem"), [
    ({}, "services.orders.slo: needs at least one objective"),
    ({"availability": "100%"}, "services.orders.slo.availability: must be between 0% and 100%"),
    ({"availability": "high"}, "services.orders.slo.availability: must be a percentage"),
    ({"p95": "fast"}, "services.orders.slo.p95: "),
    ({"p95": "1s", "window": "1s"}, "services.orders.slo.window: must be ≥ 10.0s"),
    ({"p95": "1s", "window": "60d"}, "services.orders.slo.window: must be ≤ 30d"),
    ({"p95": "1s", "min_requests": 0}, "services.orders.slo.min_requests: must be ≥ 1"),
    ({"p95": "1s", "p99": "2s"}, "services.orders.slo.p99: unknown key"),
    ("99.9%", "services.orders.slo: must be a mapping"),
])
def test_problems_name_the_path_and_value(section: object, problem: str) -> None:
    problems = slo_of(section)
    assert any(p.startswith(problem) for p in problems), problems
