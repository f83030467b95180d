"""Traffic splitting: which of a route's weighted targets gets this request (a 90/10 canary).

The cumulative weights are computed once per snapshot; a pick is one ``bisect`` over them with
a uniform ``r`` in [0, 1) that the caller draws (so tests pass a sequence and a seeded
generator gives reproducible splits). A target of weight 0 is never picked. Pure.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Sequence
from typing import Generic, TypeVar

from ..config.model import WeightedTarget

__all__ = ["WeightedChooser", "choose_target"]

T = TypeVar("T")


class WeightedChooser(Generic[T]):
    """``pick(r)`` returns an item with probability ``weight / sum(weights)``."""

    __slots__ = ("items", "weights", "_cumulative", "_total")

    def __init__(self, weighted: Iterable[tuple[T, int]]) -> None:
        pairs = [(item, weight) for item, weight in weighted if weight > 0]
        if not pairs:
            raise ValueError("at least one target needs a weight above 0")
        self.items: tuple[T, ...] = tuple(item for item, _ in pairs)
        self.weights: tuple[int, ...] = tuple(weight for _, weight in pairs)
        cumulative, running = [], 0
        for weight in self.weights:
            running += weight
            cumulative.append(running)
        self._cumulative = cumulative
        self._total = running

    @classmethod
    def of_targets(cls, targets: Sequence[WeightedTarget]) -> WeightedChooser[WeightedTarget]:
        """A route's ``to`` list (config has checked that not every weight is 0)."""
        return WeightedChooser((t, t.weight) for t in targets)

    def pick(self, r: float) -> T:
        """``r`` uniform in [0, 1)."""
        items = self.items
        if len(items) == 1:
            return items[0]
        # bisect_right: r·total == cumulative[i] belongs to the next item, so each item owns
        # exactly its half-open interval [cumulative[i-1], cumulative[i]).
        index = bisect_right(self._cumulative, r * self._total)
        return items[min(index, len(items) - 1)]  # min: guards r == 1.0 from a sloppy caller

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        share = ", ".join(f"{item!r}:{w}" for item, w in zip(self.items, self.weights, strict=True))
        return f"<WeightedChooser {share}>"


def choose_target(targets: Sequence[WeightedTarget], r: float) -> WeightedTarget:
    """One-off pick without a prebuilt table (a route with one target needs none)."""
    if len(targets) == 1:
        return targets[0]
    return WeightedChooser.of_targets(targets).pick(r)
