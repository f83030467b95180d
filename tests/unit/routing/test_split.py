"""Weighted traffic splitting: exact intervals, and a 90/10 canary within ±2% over 10,000."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from sidecar.config.model import WeightedTarget
from sidecar.routing.split import WeightedChooser, choose_target


def test_each_item_owns_its_half_open_interval() -> None:
    chooser = WeightedChooser([("a", 1), ("b", 3)])
    assert [chooser.pick(r) for r in (0.0, 0.2499, 0.25, 0.9999)] == ["a", "a", "b", "b"]


def test_ninety_ten_canary_within_two_percent_over_10k() -> None:
    chooser = WeightedChooser.of_targets([WeightedTarget("orders", 90),
                                          WeightedTarget("orders-v2", 10)])
    rng = random.Random(2024)
    counts = Counter(chooser.pick(rng.random()).service for _ in range(10_000))
    assert abs(counts["orders"] / 10_000 - 0.9) <= 0.02
    assert abs(counts["orders-v2"] / 10_000 - 0.1) <= 0.02


@pytest.mark.parametrize("seed", range(5))
def test_three_way_split_within_two_percent(seed: int) -> None:
    chooser = WeightedChooser([("a", 50), ("b", 30), ("c", 20)])
    rng = random.Random(seed)
    counts = Counter(chooser.pick(rng.random()) for _ in range(10_000))
    for item, share in (("a", 0.5), ("b", 0.3), ("c", 0.2)):
        assert abs(counts[item] / 10_000 - share) <= 0.02


def test_zero_weight_is_never_picked() -> None:
    chooser = WeightedChooser([("dark", 0), ("live", 5)])
    assert {chooser.pick(r / 100) for r in range(100)} == {"live"}
    assert len(chooser) == 1


def test_all_zero_is_refused() -> None:
    with pytest.raises(ValueError):
        WeightedChooser([("a", 0)])


def test_r_of_one_does_not_run_off_the_end() -> None:
    assert WeightedChooser([("a", 1), ("b", 1)]).pick(1.0) == "b"


def test_choose_target() -> None:
    only = WeightedTarget("orders")
    assert choose_target((only,), 0.99) is only
    two = (WeightedTarget("a", 1), WeightedTarget("b", 1))
    assert choose_target(two, 0.7).service == "b"
    assert "a" in repr(WeightedChooser([("a", 1)]))
