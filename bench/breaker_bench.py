"""Micro-benchmark: what the circuit breaker costs per request (issue 5 asks for ≤ 5 µs).

One decision is ``try_acquire(now)`` plus ``record(now, outcome, admission)``, the two calls
the data plane makes per try. Runs each scenario several times and reports the best (the
least disturbed by the rest of the machine). Exits 1 when a scenario is over ``--max-us``.

    .venv/bin/python bench/breaker_bench.py [--number 200000] [--max-us 5]
"""

from __future__ import annotations

import argparse
import sys
import timeit
from collections.abc import Callable

from sidecar.config.resilience import BreakerConfig, ErrorRateConfig
from sidecar.upstream.circuit_breaker import CircuitBreaker
from sidecar.upstream.endpoint import Outcome


def closed_success() -> Callable[[], None]:
    """The common case: a healthy cluster, consecutive-failure breaker only."""
    breaker = CircuitBreaker(BreakerConfig())
    t = [0.0]

    def one() -> None:
        now = t[0] = t[0] + 0.0001
        breaker.record(now, Outcome.SUCCESS, breaker.try_acquire(now))  # type: ignore[arg-type]
    return one


def closed_error_rate() -> Callable[[], None]:
    """With the sliding error-rate window on, 10% failures (never enough to trip)."""
    config = BreakerConfig(consecutive_failures=0,
                           error_rate=ErrorRateConfig(threshold=0.5, window=10.0, min_requests=20))
    breaker = CircuitBreaker(config)
    t = [0.0]
    n = [0]

    def one() -> None:
        now = t[0] = t[0] + 0.0001  # 10,000 requests/s: buckets roll every 1,000 decisions
        n[0] += 1
        outcome = Outcome.GATEWAY_ERROR if n[0] % 10 == 0 else Outcome.SUCCESS
        breaker.record(now, outcome, breaker.try_acquire(now))  # type: ignore[arg-type]
    return one


def open_rejection() -> Callable[[], None]:
    """An open breaker refusing: the path a failing upstream's callers take."""
    breaker = CircuitBreaker(BreakerConfig(consecutive_failures=1, open_for=1e9, open_for_max=1e9))
    breaker.record(0.0, Outcome.CONNECT_FAILURE, breaker.try_acquire(0.0))  # type: ignore[arg-type]

    def one() -> None:
        breaker.try_acquire(1.0)
    return one


SCENARIOS: dict[str, Callable[[], Callable[[], None]]] = {
    "closed, success (admit + record)": closed_success,
    "closed, error-rate window (admit + record)": closed_error_rate,
    "open, rejection (admit)": open_rejection,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=200_000, help="decisions per run")
    parser.add_argument("--repeat", type=int, default=5, help="runs per scenario; best is kept")
    parser.add_argument("--max-us", type=float, default=5.0, help="budget per decision")
    args = parser.parse_args()
    over = False
    for name, make in SCENARIOS.items():
        fn = make()
        best = min(timeit.repeat(fn, number=args.number, repeat=args.repeat)) / args.number * 1e6
        verdict = "ok" if best <= args.max_us else "OVER BUDGET"
        over |= best > args.max_us
        print(f"{name:45s} {best:6.3f} µs per decision  ({verdict}, budget {args.max_us} µs)")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
