"""Round robin, least request (P2C), weights, panic threshold, and a retry's preference."""

from __future__ import annotations

import random
from collections import Counter

from sidecar.config.load_balancing import LoadBalancerConfig
from sidecar.upstream.endpoint import EndpointState
from sidecar.upstream.load_balancer import (
    LeastRequest,
    LoadBalancer,
    RoundRobin,
    endpoint_states,
    load_balancer_for,
)

NOW = 1000.0


def cluster(n: int, weights: list[int] | None = None) -> list[EndpointState]:
    weights = weights or [1] * n
    return [EndpointState((f"10.0.0.{i + 1}", 8080), weight=w) for i, w in enumerate(weights)]


def names(picks: list[EndpointState | None]) -> list[str]:
    return [p.address[0].rsplit(".", 1)[1] if p else "-" for p in picks]


def run(lb: LoadBalancer, endpoints: list[EndpointState], n: int, **kw: object) -> list[str]:
    return names([lb.pick(endpoints, NOW, **kw) for _ in range(n)])  # type: ignore[arg-type]


# --- round robin ----------------------------------------------------------------------


def test_round_robin_order() -> None:
    assert run(RoundRobin(), cluster(3), 7) == ["1", "2", "3", "1", "2", "3", "1"]


def test_round_robin_skips_unhealthy_and_ejected() -> None:
    eps = cluster(4)
    eps[1].healthy = False
    eps[2].ejected_until = NOW + 5
    assert run(RoundRobin(panic_threshold=0.0), eps, 4) == ["1", "4", "1", "4"]
    eps[2].ejected_until = NOW  # the ejection ends exactly now: back in
    assert set(run(RoundRobin(panic_threshold=0.0), eps, 3)) == {"1", "3", "4"}


def test_smooth_weights_are_spread_not_bunched() -> None:
    assert run(RoundRobin(), cluster(3, [5, 1, 1]), 7) == ["1", "1", "2", "1", "3", "1", "1"]


def test_weights_within_two_percent_over_10k() -> None:
    counts = Counter(run(RoundRobin(), cluster(3, [1, 3, 6]), 10_000))
    for name, share in (("1", 0.1), ("2", 0.3), ("3", 0.6)):
        assert abs(counts[name] / 10_000 - share) <= 0.02


# --- least request --------------------------------------------------------------------


def test_p2c_prefers_the_less_loaded() -> None:
    eps = cluster(2)
    eps[0].active_requests = 10
    assert set(run(LeastRequest(rand=random.Random(3).random), eps, 100)) == {"2"}


def test_p2c_never_picks_the_most_loaded_of_three() -> None:
    eps = cluster(3)
    eps[0].active_requests, eps[1].active_requests, eps[2].active_requests = 5, 0, 9
    counts = Counter(run(LeastRequest(rand=random.Random(5).random), eps, 3000))
    assert counts["3"] == 0
    assert counts["2"] > counts["1"] > 0  # 2 wins every pair it is in


def test_p2c_spreads_evenly_when_loads_are_equal() -> None:
    counts = Counter(run(LeastRequest(rand=random.Random(11).random), cluster(4), 10_000))
    assert all(abs(c / 10_000 - 0.25) <= 0.02 for c in counts.values())


def test_p2c_weighs_load_against_weight() -> None:
    eps = cluster(2, [4, 1])
    eps[0].active_requests, eps[1].active_requests = 3, 1  # 4/4 = 1 per weight vs 2/1
    assert set(run(LeastRequest(rand=random.Random(1).random), eps, 50)) == {"1"}


# --- panic threshold ------------------------------------------------------------------


def test_panic_uses_every_endpoint_when_too_few_are_available() -> None:
    eps = cluster(4)
    for e in eps[1:]:
        e.healthy = False  # 25% available < 50%
    lb = RoundRobin(panic_threshold=0.5)
    assert run(lb, eps, 4) == ["1", "2", "3", "4"]
    assert lb.panics == 4


def test_no_panic_at_the_threshold() -> None:
    eps = cluster(4)
    eps[2].healthy = eps[3].healthy = False  # 50% available: not below 50%
    lb = RoundRobin(panic_threshold=0.5)
    assert run(lb, eps, 4) == ["1", "2", "1", "2"]
    assert lb.panics == 0


def test_panic_threshold_zero_means_none_when_none_is_available() -> None:
    eps = cluster(2)
    for e in eps:
        e.healthy = False
    assert RoundRobin(panic_threshold=0.0).pick(eps, NOW) is None
    assert LeastRequest(panic_threshold=0.0).pick(eps, NOW) is None


def test_empty_cluster() -> None:
    assert RoundRobin().pick([], NOW) is None
    assert LeastRequest().pick([], NOW) is None


def test_one_endpoint_is_every_policys_answer_in_every_state() -> None:
    # An inbound sidecar's local app: the only endpoint, tried already or not; down, it is
    # still used in panic mode and refused with the panic threshold at 0.
    for lb in (RoundRobin(), LeastRequest()):
        [only] = eps = cluster(1)
        assert lb.pick(eps, NOW) is only and lb.pick(eps, NOW, exclude={only.address}) is only
        assert (only.current_weight, lb.panics) == (0, 0)  # nothing left behind by a pick
        only.ejected_until = NOW + 5
        assert lb.pick(eps, NOW) is only and lb.panics == 1
        only.ejected_until, only.healthy = 0.0, False
        assert lb.pick(eps, NOW) is only and lb.panics == 2
    for lb in (RoundRobin(panic_threshold=0.0), LeastRequest(panic_threshold=0.0)):
        [only] = eps = cluster(1)
        only.healthy = False
        assert lb.pick(eps, NOW) is None


# --- a retry prefers another endpoint -------------------------------------------------


def test_exclude_prefers_endpoints_not_tried() -> None:
    eps = cluster(3)
    tried = {eps[0].address, eps[1].address}
    assert run(RoundRobin(), eps, 3, exclude=tried) == ["3", "3", "3"]
    assert set(run(LeastRequest(), eps, 20, exclude=tried)) == {"3"}


def test_exclude_falls_back_when_all_were_tried() -> None:
    eps = cluster(2)
    tried = {e.address for e in eps}
    assert set(run(RoundRobin(), eps, 4, exclude=tried)) == {"1", "2"}
    assert LeastRequest().pick(eps, NOW, exclude=tried) is not None


def test_exclude_never_prefers_an_unavailable_endpoint() -> None:
    eps = cluster(3)
    eps[2].healthy = False
    tried = {eps[0].address, eps[1].address}
    # Both available ones were tried; the unhealthy one is still not used.
    assert set(run(RoundRobin(panic_threshold=0.0), eps, 4, exclude=tried)) == {"1", "2"}


# --- building -------------------------------------------------------------------------


def test_endpoint_states_keep_state_across_snapshots_and_apply_weights() -> None:
    a, b, c = ("10.0.0.1", 80), ("10.0.0.2", 80), ("10.0.0.3", 80)
    first = endpoint_states([a, b], LoadBalancerConfig())
    first[0].healthy = False
    second = endpoint_states([a, c], LoadBalancerConfig(weights=((c, 5),)), previous=first)
    assert second[0] is first[0] and not second[0].healthy
    assert second[1].address == c and second[1].weight == 5
    assert second[0].weight == 1


def test_load_balancer_for() -> None:
    assert isinstance(load_balancer_for(LoadBalancerConfig()), RoundRobin)
    lb = load_balancer_for(LoadBalancerConfig(policy="least_request", panic_threshold=0.3))
    assert isinstance(lb, LeastRequest) and lb.panic_threshold == 0.3
