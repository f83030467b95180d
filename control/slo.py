"""Each service against its objectives (the ``slo`` section of the mesh config, parsed by
``sidecar.config.slo``), over its SLO window, and the error budget left.

The error budget is the share of requests allowed to fail (``1 - availability``, or
``error_rate``, whichever is stricter); ``budget_remaining`` is 1 with no errors, 0 when the
window used all of it, negative past that. A service with fewer than ``min_requests``
requests in its window gets no verdict ("no_data"), so one failed request after a quiet night
is not an outage. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from control.stats import Counts
from sidecar.config.reader import Fields, Problems
from sidecar.config.slo import SloConfig, parse_slo

__all__ = ["SloStatus", "evaluate", "objectives_of"]


def objectives_of(mesh: Any) -> dict[str, SloConfig]:
    """Service -> SloConfig for every service of an applied mesh that has an ``slo``. The
    mesh was validated when applied, so problems here are not expected; a service whose
    section has some anyway is left out rather than measured against a half-read objective."""
    out: dict[str, SloConfig] = {}
    services = mesh.get("services") if isinstance(mesh, dict) else None
    for name, node in (services or {}).items():
        if not isinstance(node, dict) or node.get("slo") is None:
            continue
        problems = Problems()
        config = parse_slo(Fields(node["slo"], f"services.{name}.slo", problems))
        if not problems.items:
            out[str(name)] = config
    return out


@dataclass(frozen=True, slots=True)
class Objective:
    name: str  # availability, error_rate, p95, breaker_activation
    target: float
    actual: float | None
    ok: bool | None  # None: no verdict (no data)

    def view(self) -> dict[str, Any]:
        return {"name": self.name, "target": self.target, "actual": self.actual, "ok": self.ok}


@dataclass(frozen=True, slots=True)
class SloStatus:
    service: str
    window: float
    covered: float  # seconds of the window that had data (less than window while young)
    requests: int
    state: str  # "ok", "violated" or "no_data"
    objectives: tuple[Objective, ...]
    budget_remaining: float | None  # None: no availability/error-rate objective, or no data

    @property
    def violated(self) -> bool:
        return self.state == "violated"

    def view(self) -> dict[str, Any]:
        return {"service": self.service, "window": self.window, "covered": self.covered,
                "requests": self.requests, "state": self.state,
                "budget_remaining": self.budget_remaining,
                "objectives": [o.view() for o in self.objectives]}


def evaluate(service: str, slo: SloConfig, counts: Counts, covered: float) -> SloStatus:
    enough = counts.requests >= slo.min_requests
    error_ratio = counts.errors / counts.requests if counts.requests else None
    p95 = counts.quantile(0.95)
    activation = counts.breaker_opens / counts.requests if counts.requests else None
    objectives = []

    def judge(name: str, target: float | None, actual: float | None, higher_is_better: bool) -> None:
        if target is None:
            return
        ok = None
        if enough and actual is not None:
            ok = actual >= target if higher_is_better else actual <= target
        objectives.append(Objective(name, target, actual, ok))

    judge("availability", slo.availability, None if error_ratio is None else 1 - error_ratio, True)
    judge("error_rate", slo.error_rate, error_ratio, False)
    judge("p95", slo.p95, p95, False)
    judge("breaker_activation", slo.breaker_activation, activation, False)
    allowed = slo.allowed_error_ratio
    budget = None
    if allowed is not None and error_ratio is not None and enough:
        budget = 1 - error_ratio / allowed
    if not enough:
        state = "no_data"
    elif any(o.ok is False for o in objectives):
        state = "violated"
    else:
        state = "ok"
    return SloStatus(service=service, window=slo.window, covered=covered,
                     requests=counts.requests, state=state, objectives=tuple(objectives),
                     budget_remaining=budget)
